"""The training step and epoch against independent references: clipping as timm's train.py applies it, a last partial
update under gradient accumulation, uint8 batches normalised on the device, the precision --amp-dtype auto picks, and
RNG states restored at another world size."""
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

from conftest import loader_args
import pgt.checkpoint as checkpoint
from pgt import PowerGradCrossEntropy
from pgt.config import auto_amp_dtype, resolve_device_settings
from pgt.data import SeededSamples, ShardedSampler, build_dataset
from pgt.loaders import build_loaders
from pgt.engine import TrainingParts, make_scaler, to_device, train_one_epoch, train_step
from pgt.errors import UsageError
from pgt.optim import clip_parameters

CPU = torch.device('cpu')


# ---- clipping

def agc_reference(weight: np.ndarray, grad: np.ndarray, factor: float, eps: float = 1e-3) -> np.ndarray:
    """Brock et al. (2021), Eq. 3, float64, unit by unit: an output unit's gradient G_i is rescaled to
    factor * max(||W_i||, eps) when its norm exceeds that. Units are rows (dim 0) of >1-D weights, the whole
    tensor for biases and norm parameters."""
    w = weight.reshape(weight.shape[0], -1) if weight.ndim > 1 else weight.reshape(1, -1)
    g = grad.reshape(w.shape).copy()
    limit = factor * np.maximum(np.linalg.norm(w, axis=1), eps)
    norms = np.linalg.norm(g, axis=1)
    scale = np.where(norms > limit, limit / np.maximum(norms, 1e-6), 1.0)
    return (g * scale[:, None]).reshape(grad.shape)


def one_update(model, clip_mode: str, clip: float, loss_scale: float) -> dict:
    """One update with plain SGD at lr 1, its loss scaled up so that clipping acts: {name: (weight before, gradient
    before clipping, the change the update made)}; the change is minus the gradient the optimizer received."""
    torch.manual_seed(0)
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
    loss_fn = lambda logits, y: loss_scale * torch.nn.functional.cross_entropy(logits, y)  # noqa: E731
    parts = TrainingParts(model, loss_fn, torch.optim.SGD(model.parameters(), lr=1.0), make_scaler(CPU, None), None,
                          clip, clip_mode, clip_parameters(model, clip_mode))
    raw = {}
    parts.grad_observer = lambda lr: raw.update({n: p.grad.clone() for n, p in model.named_parameters()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(parts, [(images, targets)], CPU)
    return {n: (before[n], raw[n], before[n] - p.detach()) for n, p in model.named_parameters()}


def test_agc_clips_the_body_as_brock_et_al_and_leaves_the_classifier_out():
    model = timm.create_model('test_resnet', num_classes=3)
    factor = 0.01
    updates = one_update(model, 'agc', factor, loss_scale=1e3)
    head = {'fc.weight', 'fc.bias'}
    for name, (weight, grad, applied) in updates.items():
        if name in head:
            assert torch.equal(applied, grad), name  # unclipped although far over the limit
            assert not np.allclose(agc_reference(weight.double().numpy(), grad.double().numpy(), factor),
                                   grad.double().numpy())  # (the limit would have clipped it)
        else:
            expected = agc_reference(weight.double().numpy(), grad.double().numpy(), factor)
            # The change is read as w_before - w_after in float32, which rounds at eps * |w|: that is the bound.
            bound = 4 * torch.finfo(torch.float32).eps * float(weight.abs().max()) + 1e-6 * np.abs(expected).max()
            assert np.abs(applied.double().numpy() - expected).max() <= bound, name
    clipped = [n for n, (w, g, a) in updates.items() if n not in head and not torch.allclose(a, g)]
    assert len(clipped) > len(updates) // 2  # the body was clipped, not left alone by accident


def test_norm_clipping_includes_the_classifier():
    model = timm.create_model('test_resnet', num_classes=3)
    updates = one_update(model, 'norm', 1.0, loss_scale=1e3)
    grads = torch.cat([g.reshape(-1).double() for _, g, _ in updates.values()])
    applied = torch.cat([a.reshape(-1).double() for _, _, a in updates.values()])
    weights = torch.cat([w.reshape(-1) for w, _, _ in updates.values()])
    total = float(grads.norm())
    assert total > 1.0 and float(applied.norm()) == pytest.approx(1.0, rel=1e-5)  # every parameter in one norm
    bound = 4 * torch.finfo(torch.float32).eps * float(weights.abs().max()) + 1e-6  # w_before - w_after in float32
    assert float((applied - grads / total).abs().max()) <= bound


# ---- gradient accumulation

def test_accumulation_makes_a_last_partial_update_that_trains_on_every_batch():
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 4, 4), torch.randint(0, 5, (2,))) for _ in range(20)]

    def fresh():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)

    model, optimizer = fresh()
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    parts = TrainingParts(model, PowerGradCrossEntropy(0.3), optimizer, make_scaler(CPU, None))
    metrics = train_one_epoch(parts, batches, CPU, accum_steps=3)
    assert len(steps) == 7  # six updates of 3 micro-batches and a last one of 2
    assert metrics['loss'] == metrics['loss'] and parts.optimizer.state  # the run did train

    reference, reference_optimizer = fresh()  # the same updates written out by hand
    loss_fn = PowerGradCrossEntropy(0.3)
    for start in range(0, 20, 3):
        group = batches[start:start + 3]
        reference_optimizer.zero_grad()
        for images, targets in group:
            (loss_fn(reference(images), targets) / len(group)).backward()
        reference_optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_every_image_of_the_epoch_is_counted_under_accumulation():
    batches = [(torch.randn(2, 3, 4, 4), torch.randint(0, 5, (2,))) for _ in range(20)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
    parts = TrainingParts(model, PowerGradCrossEntropy(1.0), torch.optim.SGD(model.parameters(), lr=0.1),
                          make_scaler(CPU, None))
    seen = []
    train_one_epoch(parts, batches, CPU, accum_steps=3, on_step=lambda event: seen.append(event.images))
    assert seen == [6] * 6 + [4] and sum(seen) == 40  # the images each update was computed on


# ---- uint8 batches, normalised on the device

@pytest.mark.parametrize('channels_last', [False, True])
def test_torch_backend_batches_equal_the_float_pipeline(tiny_data, channels_last):
    """Workers hand uint8; on the device the batch is timm's float transform (ToTensor, Normalize) of the same
    seeded samples, in the layout the model trains in once to_device has run."""
    args = loader_args(tiny_data, channels_last=channels_last)
    loaders = build_loaders(args, 0, 1, CPU)
    loaders.train.sampler.set_epoch(0)
    raw, _ = next(iter(loaders.train.loader))  # the DataLoader inside the device loader: what workers hand over
    assert raw.dtype == torch.uint8 and raw.is_contiguous()
    images, targets = to_device(*next(iter(loaders.train)), CPU, channels_last)
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last) == channels_last

    float_transform = create_transform(32, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                                       color_jitter=None, interpolation='bilinear')
    reference_set = build_dataset(args, 'train')
    reference_set.transform = float_transform
    keys = list(ShardedSampler(len(reference_set), shuffle=True, seed=3, batch_size=8, seed_samples=True))[:8]
    reference = torch.stack([SeededSamples(reference_set)[key][0] for key in keys])
    assert (images - reference).abs().max() < 1e-6
    assert targets.tolist() == [int(reference_set.index.labels[i]) for i, _ in keys]


def test_validation_batches_equal_the_float_pipeline(tiny_data):
    args = loader_args(tiny_data)
    val = build_loaders(args, 0, 1, CPU).val
    images, _ = next(iter(val))
    transform = create_transform(32, is_training=False, interpolation='bilinear', crop_pct=0.875)
    samples = sorted((tiny_data / 'val').glob('*/*.JPEG'))[:8]
    reference = torch.stack([transform(Image.open(path).convert('RGB')) for path in samples])
    assert (images - reference).abs().max() < 1e-6


def test_seeding_in_the_main_process_leaves_the_training_rng_alone(tiny_data):
    """With --workers 0 the samples load in the training process: their seeding must not move its RNG streams."""
    dataset = SeededSamples(build_dataset(loader_args(tiny_data), 'train'))
    torch.manual_seed(5)
    random.seed(5)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(5)
    random.seed(5)
    dataset[(0, 123)]
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


# ---- the precision of --amp-dtype auto

@pytest.mark.parametrize('device_type,capability,expected', [
    ('cuda', (7, 0), 'float16'),  # V100, the papers' GPU: bfloat16 only emulated
    ('cuda', (7, 5), 'float16'),  # T4
    ('cuda', (8, 0), 'bfloat16'),  # A100
    ('cuda', (9, 0), 'bfloat16'),  # H100
    ('cpu', None, 'bfloat16'),
])
def test_auto_precision_is_bfloat16_only_where_the_hardware_has_it(device_type, capability, expected):
    assert auto_amp_dtype(device_type, capability) == expected


def test_device_settings_on_a_cpu_ask_nothing_of_cuda_and_refuse_sync_batch_norm(monkeypatch):
    def no_cuda_query(*args, **kwargs):
        raise AssertionError('CUDA was queried for a CPU run')
    monkeypatch.setattr(torch.cuda, 'get_device_capability', no_cuda_query)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', no_cuda_query)
    args = SimpleNamespace(amp_dtype='auto', sync_bn=False, _origins={})
    resolve_device_settings(args, CPU)
    assert args.amp_dtype == 'bfloat16'
    with pytest.raises(UsageError, match="SyncBatchNorm runs on CUDA devices only"):
        resolve_device_settings(SimpleNamespace(amp_dtype='float16', sync_bn=True, _origins={}), CPU)


# ---- RNG states at another world size

def test_resume_on_fewer_devices_restores_the_own_device_state_only(monkeypatch):
    """A checkpoint of 2 ranks, each holding the CUDA RNG state of its own device, resumed by 1 rank on 1 visible
    device: the rank restores rank 0's state on its current device, and nothing indexes a second device (the
    IndexError of set_rng_state_all with states of more devices than are visible)."""
    cuda_states = [torch.randint(0, 255, (16,), dtype=torch.uint8) for _ in range(2)]
    ranks = []
    for state in cuda_states:
        rng = checkpoint.rng_state()
        rng['cuda'] = state
        ranks.append({'rng': rng, 'meters': None})
    restored = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device='cuda': restored.append((state, device)))
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda states: pytest.fail('restored every device'))
    rng, meters = checkpoint.rank_state({'ranks': ranks}, rank=0, world_size=1)
    checkpoint.set_rng_state(rng)
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_states[0]) and restored[0][1] == 'cuda'
    assert meters is None


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    state = checkpoint.rng_state()
    expected = (torch.rand(2), random.random(), np.random.rand())
    checkpoint.save_checkpoint({'rng': state}, tmp_path / 'rng.pth')
    checkpoint.set_rng_state(torch.load(tmp_path / 'rng.pth', weights_only=True)['rng'])
    assert torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1]
    assert math.isclose(np.random.rand(), expected[2])
