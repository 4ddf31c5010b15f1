"""The GPU resume path's defects, each run where it can run on a CPU (fused SGD and torch.amp.GradScaler('cpu'),
gloo ranks): a checkpoint of a non-fused optimizer resumed into a fused one, the finite check of a checkpoint on
ranks whose batch-norm buffers differ, --amp-dtype on a resume without --amp and across precisions, DALI's failures
told apart, and the diagnostics probe bounded. tests/test_cuda.py runs them on a GPU."""
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import BASE, copy_run, run_main
from pgt.checkpoint import save_checkpoint
from pgt.config import config_changes
from pgt.diagnostics import PROBE_IMAGES, Diagnostics
from pgt.engine import SkipStreak, make_scaler
from pgt.errors import TrainingDiverged
from pgt.optim import load_optimizer_state
from pgt.trainstate import TrainState
from pgt.transform import PowerGradCrossEntropy

CPU = torch.device('cpu')


def fp16_step(model, optimizer, scaler):
    with torch.autocast('cpu', dtype=torch.float16):
        loss = model(torch.randn(4, 3)).square().mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()


def test_a_checkpoint_of_a_non_fused_optimizer_resumes_into_a_fused_one():
    """A checkpoint written on a CPU (fused=None) and resumed on a GPU, where the optimizer is fused: loaded as it
    is, the flags come back as None and GradScaler.step refuses the fused optimizer."""
    model = torch.nn.Linear(3, 2)
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fp16_step(model, plain, torch.amp.GradScaler('cpu', init_scale=1.0))  # a step taken: momentum exists
    state = plain.state_dict()
    as_is = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    as_is.load_state_dict(state)
    with pytest.raises(AssertionError, match='Expected grad_scale and found_inf to be None'):  # torch's own assert
        fp16_step(model, as_is, torch.amp.GradScaler('cpu'))
    fused = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    load_optimizer_state(fused, state)
    assert torch.equal(fused.state[model.weight]['momentum_buffer'], state['state'][0]['momentum_buffer'])
    fp16_step(model, fused, torch.amp.GradScaler('cpu'))
    assert fused.param_groups[0]['fused'] is True


def _finite_check_worker(rank, init_file, result_file, poisoned_rank):
    import torch.distributed as dist
    from pgt.distributed import DistEnv
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    model = torch.nn.BatchNorm1d(3)
    if rank == poisoned_rank:
        model.running_var.fill_(math.inf)  # batch-norm buffers differ between ranks; this one's overflowed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(Path(result_file).parent / 'run', model, optimizer, make_scaler(CPU, None),
                       SkipStreak.zeros(CPU), DistEnv(rank, 2), {'model': 'bn', 'num_classes': 3}, [], 10, {})
    (Path(result_file).parent / 'run').mkdir(exist_ok=True)
    try:
        state.write(state.checkpoint(0, 10, None), ['last.pth'])
        outcome = 'written'
    except TrainingDiverged:
        outcome = 'diverged'
    Path(f'{result_file}.{rank}').write_text(outcome)
    dist.destroy_process_group()
    # Leave at once: gloo's threads were seen to abort the interpreter's teardown under load ("terminate called
    # without an active exception"), after the result above is written.
    os._exit(0)


@pytest.mark.parametrize('poisoned_rank,outcome', [(1, 'written'), (0, 'diverged')])
def test_the_finite_check_of_a_checkpoint_is_rank_0s_and_every_rank_hears_it(tmp_path, poisoned_rank, outcome):
    """Each rank checked its own buffers, and a rank whose statistics had overflowed raised while the others waited
    in the broadcast of the write: the run hung. Rank 0 writes the checkpoint, so rank 0 checks it, and every rank
    ends the same way."""
    result = tmp_path / 'result'
    torch.multiprocessing.spawn(_finite_check_worker, args=(str(tmp_path / 'init'), str(result), poisoned_rank),
                                nprocs=2, join=True)
    assert [Path(f'{result}.{rank}').read_text() for rank in (0, 1)] == [outcome, outcome]
    assert (tmp_path / 'run' / 'last.pth').exists() == (outcome == 'written')


def test_amp_dtype_is_not_compared_on_a_resume_without_amp(straight_run, tiny_data, tmp_path):
    """--amp-dtype auto resolves per device: bfloat16 on an A100 (and a CPU), float16 on a V100. A float32 run
    requeued onto another GPU was refused as another configuration."""
    assert config_changes({'amp': False, 'amp_dtype': 'bfloat16'}, {'amp': False, 'amp_dtype': 'float16'}, 1, 1) == []
    assert config_changes({'amp': True, 'amp_dtype': 'bfloat16'}, {'amp': True, 'amp_dtype': 'float16'}, 1, 1) == [
        'amp_dtype: bfloat16 -> float16']
    run_dir = copy_run(straight_run, tmp_path / 'run')
    (run_dir / 'last.pth').unlink()
    result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, '--resume', 'auto',
                      '--amp-dtype', 'float16', check=True)
    assert 'changed configuration' not in result.stderr


def restored_scale(folder: Path, saved: torch.amp.GradScaler, saved_dtype: str, run_dtype: str) -> float:
    """The loss scale of a run with ``run_dtype`` after it resumed a checkpoint of a ``saved_dtype`` run whose scaler
    was ``saved``."""
    from pgt.checkpoint import rng_state
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint({'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
                     'scaler': saved.state_dict(), 'skip_streak': {'current': 0}, 'best': {'top1': 1.0, 'epoch': 0},
                     'epoch': 0, 'step': 10, 'epoch_steps': 10, 'ranks': [{'rng': rng_state(), 'meters': None}],
                     'world_size': 1, 'args': {'amp': True, 'amp_dtype': saved_dtype}}, folder / 'last.pth')
    scaler = make_scaler(CPU, getattr(torch, run_dtype))
    state = TrainState(folder, model, optimizer, scaler, SkipStreak.zeros(CPU), SimpleNamespace(rank=0, world_size=1,
                       device=CPU), {'model': 'linear', 'num_classes': 2, 'amp': True, 'amp_dtype': run_dtype}, [], 10,
                       {})
    state.restore(folder / 'last.pth', torch.load(folder / 'last.pth', weights_only=True))
    return scaler.get_scale()


def test_a_scaler_of_another_precision_is_not_loaded(tmp_path):
    """Forced across precisions (--allow-config-change), a bfloat16 run's scaler (scale 1, never growing) loaded into
    a float16 run left its gradients unscaled: they underflow in float16, silently."""
    assert restored_scale(tmp_path, make_scaler(CPU, torch.bfloat16), 'bfloat16', 'float16') == 2.0 ** 16
    moved = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)  # a float16 run whose scale has backed off
    assert restored_scale(tmp_path, moved, 'float16', 'float16') == 2.0 ** 10  # the same precision continues


def test_only_a_readers_or_decoders_failure_is_an_unreadable_file():
    """Any RuntimeError with 'pipeline' in it was reported as an unreadable image, out-of-memory included."""
    from pgt.dali import is_data_error
    stopped = RuntimeError('Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\n'
                           'encountered:\n\nnvImageCodec failure: \'#3\'\nCurrent pipeline object is no longer valid.')
    memory = RuntimeError('Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`,\n'
                          'encountered:\n\nCUDA allocation failed: out of memory')
    other = RuntimeError('Critical error in pipeline:\nError in GPU operator `nvidia.dali.fn.resize`, encountered: '
                         'invalid argument')
    assert [is_data_error(e) for e in (stopped, memory, other)] == [True, False, False]


def test_the_diagnostics_probe_is_bounded_whatever_the_batch(tmp_path):
    """The probe ran in float32 on the whole first validation batch: at a recipe's 256 images per GPU, gigabytes on
    rank 0 beside training. It takes the first PROBE_IMAGES."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 5))
    probe = (torch.randn(256, 3, 8, 8), torch.arange(256) % 5)
    runlog = SimpleNamespace(scalar=lambda *a: None, histogram=lambda *a: None)
    diagnostics = Diagnostics(model, PowerGradCrossEntropy(0.3), probe, 1, tmp_path, runlog)
    assert PROBE_IMAGES == 32 and diagnostics.images.shape[0] == diagnostics.targets.shape[0] == 32
    assert torch.equal(diagnostics.images, probe[0][:32])
