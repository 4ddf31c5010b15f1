"""The CUDA paths, for a GPU node: `bash scripts/test.sh -m cuda`. On a machine without CUDA every test here is
skipped with that reason (tests/conftest.py); `pytest --collect-only -m cuda` lists them.

Each check of scripts/preflight.py has a test, and so have the cluster paths that the CPU tests reach only by
simulation: the precision --amp-dtype auto picks, the RNG state of the rank's own device, SyncBatchNorm with
diagnostics on two GPUs, and the absence of host synchronisations in the training step and in evaluation."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import BASE, ROOT
from pgt import preflight
from pgt.checkpoint import rng_state, set_rng_state
from pgt.config import auto_amp_dtype
from pgt.engine import BufferGuard, TrainingParts, evaluate, evaluation_sums, make_scaler, train_step

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


def test_auto_precision_matches_the_devices_hardware():
    capability = torch.cuda.get_device_capability()
    assert auto_amp_dtype('cuda', capability) == ('bfloat16' if capability >= (8, 0) else 'float16')


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
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
               str(ROOT / 'train.py'), *map(str, BASE), '--data-dir', str(tiny_data), '--output', str(tmp_path / 'r'),
               '--global-batch-size', '32', '--sync-bn', '--diagnostics', '--diagnostics-interval', '3',
               '--diagnostics-layers', '1', '--workers', '0']
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'r' / 'diagnostics.csv').is_file()
