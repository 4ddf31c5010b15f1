"""The GPU acceptance run, for the first person with a GPU node: `bash scripts/test.sh -m cuda` (one GPU; the DDP
tests need two). On a machine without CUDA every test here is skipped with that reason (tests/conftest.py);
`pytest --collect-only -m cuda` lists them.

End to end on the GPU: train.py in float16 and bfloat16, a run killed and resumed equal to the uninterrupted one
bit for bit (--deterministic), validate.py equal to the CPU's numbers, the DALI GPU loader over a JPEG tree
(sharding, last batch, counts), torch.compile with gradient accumulation, a CPU checkpoint resumed with fused SGD
and the float16 scaler, the diagnostics probe's memory at a recipe's batch; with two GPUs, DDP over NCCL stopped by
a signal and resumed. Then each check of scripts/preflight.py, the RNG state of the rank's own device, SyncBatchNorm
with diagnostics on two GPUs, and the absence of host synchronisations in the training step and in evaluation."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (BASE, ROOT, SMOKE, assert_same_weights, model_state, read_until, run_main, start_training,
                      summary_values, torchrun_command)
from pgt import preflight
from pgt.checkpoint import rng_state, set_rng_state
from pgt.engine import BufferGuard, TrainingParts, evaluate, evaluation_sums, make_scaler, train_step
from pgt.runlog import read_summary

pytestmark = pytest.mark.cuda
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two CUDA GPUs')


@pytest.mark.parametrize('check', [preflight.check_float16_scaler, preflight.check_bfloat16,
                                   preflight.check_fused_sgd, preflight.check_channels_last, preflight.check_compile])
def test_preflight_cuda_check_passes(check):
    result = check()
    if result.status == 'skip':  # bfloat16 on a GPU without it: the skip says why
        pytest.skip(result.detail)
    assert result.status == 'pass', result.detail


@two_gpus
def test_preflight_collectives_pass():
    result = preflight.check_collectives()
    assert result.status == 'pass', result.detail


def test_preflight_dali_gpu_decoding_passes(tiny_data):
    pytest.importorskip('nvidia.dali', reason='NVIDIA DALI is not installed (requirements-dali.txt)')
    files = [str(p) for p in sorted((tiny_data / 'train').glob('*/*.JPEG'))]
    result = preflight.check_dali_gpu(files)
    assert result.status == 'pass', result.detail


def test_rng_state_is_the_current_devices_and_round_trips():
    torch.cuda.manual_seed(3)
    state = rng_state()
    assert state['cuda'].dtype == torch.uint8 and 'cuda_all' not in state
    expected = torch.rand(4, device='cuda')
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device='cuda'), expected)


def test_training_step_and_evaluation_do_not_synchronise_with_the_host():
    """CUDA's sync debug mode raises on any host synchronisation: none in a step (skip detection, buffer guard and
    fused SGD included) or in an evaluation batch (unreadable images left out by weights)."""
    device = torch.device('cuda')
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    from pgt import PowerGradCrossEntropy
    parts = TrainingParts(model, PowerGradCrossEntropy(0.3, check_targets=False), optimizer,
                          make_scaler(device, torch.bfloat16), torch.bfloat16, buffer_guard=BufferGuard(model))
    batch = (torch.randn(8, 3, 16, 16, device=device), torch.randint(0, 10, (8,), device=device))
    train_step(parts, [batch], device)  # first step: lazy state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        train_step(parts, [batch], device)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    targets = batch[1].clone()
    targets[0] = -1  # an unreadable image
    loader = [(batch[0], targets)] * 3
    torch.cuda.set_sync_debug_mode('error')
    try:
        evaluation_sums(model, loader, device)  # evaluate's per-batch work; it reads the sums once, at the end
    finally:
        torch.cuda.set_sync_debug_mode('default')
    result = evaluate(model, loader, device)
    assert result['images'] == 21 and result['unreadable'] == 3


@two_gpus
def test_sync_batch_norm_with_diagnostics_on_two_gpus_finishes(tiny_data, tmp_path):
    """Diagnostics probe on rank 0 alone; with SyncBatchNorm they run on a plain-BN copy, so no rank waits in a
    collective that the others never join."""
    command = torchrun_command(*BASE, '--data-dir', tiny_data, '--output', tmp_path / 'r', '--global-batch-size', 32,
                               '--sync-bn', '--diagnostics', '--diagnostics-interval', 3, '--diagnostics-layers', 1,
                               '--workers', 0)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'r' / 'diagnostics.csv').is_file()


# ---- the acceptance run: train.py, validate.py and the loaders end to end on the GPU

@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_the_smoke_recipe_learns_on_the_gpu_in_each_precision(dtype, tiny_data, tmp_path):
    if dtype == 'bfloat16' and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip('bfloat16 needs compute capability 8.0 (this GPU only emulates it)')
    run_dir = tmp_path / dtype
    run_main('train.py', '--config', SMOKE, '--data-dir', tiny_data, '--output', run_dir, '--amp', '--amp-dtype',
             dtype, '--channels-last', check=True)
    rows = read_summary(run_dir)
    assert len(rows) == 6 and float(rows[-1]['eval_top1']) >= 60.0, rows[-1]  # chance is 10%
    scale = torch.load(run_dir / 'last.pth', weights_only=True)['scaler']['scale']
    assert (0 < float(scale) <= 2.0 ** 16) if dtype == 'float16' else float(scale) == 1.0


def test_a_run_killed_and_resumed_on_the_gpu_equals_the_uninterrupted_one_bit_for_bit(tiny_data, tmp_path):
    common = [*BASE, '--data-dir', tiny_data, '--amp', '--amp-dtype', 'float16', '--deterministic']
    run_main('train.py', *common, '--output', tmp_path / 'straight', check=True)
    process = start_training(*common, '--output', tmp_path / 'killed')
    read_until(process, r'epoch 1/1 step 5/')  # past the recovery checkpoint of step 3
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run_main('train.py', *common, '--output', tmp_path / 'killed', '--resume', 'auto', check=True)
    assert_same_weights(model_state(tmp_path / 'killed' / 'last.pth'), model_state(tmp_path / 'straight' / 'last.pth'),
                        tol=0)
    assert summary_values(tmp_path / 'killed') == summary_values(tmp_path / 'straight')


def test_validate_on_the_gpu_equals_the_cpu(tiny_data, tmp_path):
    run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', tmp_path / 'run', check=True)
    gpu = json.loads(run_main('validate.py', '--checkpoint', tmp_path / 'run' / 'last.pth', '--data-dir', tiny_data,
                              '--json', check=True).stdout)
    cpu = subprocess.run([sys.executable, 'validate.py', '--checkpoint', str(tmp_path / 'run' / 'last.pth'),
                          '--data-dir', str(tiny_data), '--json'], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''}, check=True)
    cpu = json.loads(cpu.stdout)
    assert gpu['images'] == cpu['images'] == 80
    assert gpu['top1'] == cpu['top1'] and gpu['loss'] == pytest.approx(cpu['loss'], rel=1e-3)


def test_the_dali_gpu_loader_shards_counts_and_keeps_the_last_batch(tmp_path):
    pytest.importorskip('nvidia.dali', reason='NVIDIA DALI is not installed (requirements-dali.txt)')
    from test_dali import dali_args, labels_of, unique_label_tree
    from pgt.loaders import build_loaders
    data = unique_label_tree(tmp_path / 'unique', 25)
    train, val = [], []
    for rank in (0, 1):
        loaders = build_loaders(dali_args(data, batch_size=4, dali_device='gpu'), rank, 2, torch.device('cuda'))
        assert len(loaders.train) == 13 // 4  # 13 images per shard (25 padded to 26), full batches only
        images, _ = next(iter(loaders.train))
        assert images.is_cuda and images.shape == (4, 3, 32, 32)
        train += labels_of(loaders.train)
        val += labels_of(loaders.val)
    assert len(train) == 2 * 3 * 4 and len(train) - len(set(train)) <= 1  # at most the one padded file twice
    assert sorted(val) == list(range(25))  # every validation image once, the last partial batches kept


def test_compile_with_gradient_accumulation_trains(tiny_data, tmp_path):
    run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', tmp_path / 'run', '--torchcompile',
             '--grad-accum-steps', 2, '--global-batch-size', 32, check=True)
    losses = [float(row['train_loss']) for row in read_summary(tmp_path / 'run')]
    assert len(losses) == 2 and all(loss == loss for loss in losses) and losses[1] < losses[0]


def test_a_checkpoint_written_on_a_cpu_resumes_with_fused_sgd_and_the_float16_scaler(tiny_data, tmp_path):
    """The optimizer is fused on a GPU; a CPU checkpoint's says fused=None, which GradScaler.step refused."""
    subprocess.run([sys.executable, 'train.py', *map(str, BASE), '--data-dir', str(tiny_data), '--output',
                    str(tmp_path / 'run'), '--stop-after-epoch', '0'], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', tmp_path / 'run', '--resume', 'auto', '--amp',
             '--amp-dtype', 'float16', '--allow-config-change', check=True)
    assert len(read_summary(tmp_path / 'run')) == 2


def test_the_diagnostics_probe_fits_beside_training_on_a_16_gb_gpu(tmp_path):
    """ResNet-101 at a recipe's 256 images per GPU, 224 px: the probes add about 3 GB (pgt.diagnostics.PROBE_IMAGES),
    where the whole batch in float32 would have added over 12 GB."""
    import timm
    from types import SimpleNamespace
    from pgt import PowerGradCrossEntropy
    from pgt.diagnostics import Diagnostics
    device = torch.device('cuda')
    model = timm.create_model('resnet101', num_classes=1000).to(device)
    probe = (torch.randn(256, 3, 224, 224, device=device), torch.randint(0, 1000, (256,), device=device))
    runlog = SimpleNamespace(scalar=lambda *a: None, histogram=lambda *a: None)
    diagnostics = Diagnostics(model, PowerGradCrossEntropy(0.3), probe, 1, tmp_path, runlog)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    diagnostics.updates = 1
    diagnostics.after_step(0, 1, torch.tensor(1.0), torch.randn(8, 1000, device=device))
    assert torch.cuda.max_memory_allocated() - before < 4 * 2**30


@two_gpus
def test_ddp_over_nccl_stops_on_a_signal_and_resumes_to_the_uninterrupted_run(tiny_data, tmp_path):
    common = [*BASE, '--data-dir', tiny_data, '--global-batch-size', 32, '--workers', 0, '--deterministic',
              '--signal-check-interval', 2]
    straight = subprocess.run(torchrun_command(*common, '--output', tmp_path / 'straight'), cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = [*common, '--output', tmp_path / 'stopped', '--resume', 'auto']
    launcher = start_training(command=torchrun_command(*stopped))
    read_until(launcher, r'epoch 0/1 step 3/')
    os.killpg(launcher.pid, signal.SIGUSR1)
    _, rest = launcher.communicate(timeout=300)
    assert launcher.returncode == 75, rest[-3000:]
    resumed = subprocess.run(torchrun_command(*stopped), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(model_state(tmp_path / 'stopped' / 'last.pth'),
                        model_state(tmp_path / 'straight' / 'last.pth'), tol=0)

