"""--pgt-impl hook: the published hook's arithmetic, against the published lines written out again (in float16, as
they ran, bit for bit), at loss scales N^2 / 2, N^2 and 2 N^2; and the
failures it shows there that the exact transform does not."""
import json

import pytest
import torch
import yaml

from conftest import TINY, run_main
from references import published_hook
from pgt.published_hook import PublishedHookCrossEntropy, _PublishedHook
from pgt.runlog import read_summary
from pgt.transform import PowerGradCrossEntropy

N, C = 256, 1000
SCALES = {'N^2/2': N * N / 2, 'N^2': N * N, '2N^2': 2 * N * N}


def published_lines(grad, labels, alpha, smoothing):
    """The published hook (references.published_hook, the ICLR submission's Fig. 5 line by line), given the
    label-smoothed targets as the published train.py built them, in the dtype of ``grad``."""
    targets = torch.eye(C, dtype=grad.dtype)[labels] * (1.0 - smoothing) + smoothing / C
    return published_hook(grad, targets, alpha)


def logits_and_labels(seed=0):
    """Logits of a network part-way through training: the true class ahead by a margin that varies per image, so
    that p_y spreads over (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=generator)
    logits = 2.0 * torch.randn(N, C, generator=generator, dtype=torch.float64)
    logits[torch.arange(N), labels] += 6.0 + 4.0 * torch.randn(N, generator=generator, dtype=torch.float64)
    return logits, labels


def incoming_gradient(logits, labels, scale, smoothing):
    """What reaches the hook: S (p - q) / N of the mean cross-entropy, in float16 as autocast hands it back."""
    q = (1 - smoothing) * torch.nn.functional.one_hot(labels, C).double() + smoothing / C
    return (scale * (torch.softmax(logits, -1) - q) / N).half()


def hook_output(grad, labels, alpha, smoothing):
    logits = torch.zeros(N, C, dtype=torch.float16, requires_grad=True)
    _PublishedHook.apply(logits, labels, alpha, smoothing).backward(grad)
    return logits.grad


@pytest.mark.parametrize('scale', SCALES.values(), ids=SCALES.keys())
@pytest.mark.parametrize('alpha, smoothing', [(0.05, 0.0), (0.3, 0.0), (0.3, 0.1)])
def test_the_hook_is_the_published_lines(scale, alpha, smoothing):
    logits, labels = logits_and_labels()
    grad = incoming_gradient(logits, labels, scale, smoothing)
    ours = hook_output(grad, labels, alpha, smoothing)
    as_published = published_lines(grad, labels, alpha, smoothing)
    assert ours.dtype == torch.float16
    assert torch.equal(ours.isnan(), as_published.isnan())
    assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(as_published))  # bit for bit, in float16


def exact_scaled_gradient(logits, labels, alpha, smoothing, scale):
    """S (p' - q) / N from the exact transform, the gradient the hook means to give."""
    leaf = logits.float().requires_grad_(True)
    (PowerGradCrossEntropy(alpha, smoothing)(leaf, labels) * scale).backward()
    return leaf.grad.double()


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_the_hook_fails_where_the_scale_is_not_n_squared_and_the_exact_transform_does_not(smoothing):
    logits, labels = logits_and_labels(1)
    alpha, norms = 0.3, {}
    for name, scale in SCALES.items():
        hooked = hook_output(incoming_gradient(logits, labels, scale, smoothing), labels, alpha, smoothing).double()
        exact = exact_scaled_gradient(logits, labels, alpha, smoothing, scale)
        assert exact.isfinite().all()
        finite = hooked.isfinite().all(-1)
        norms[name] = (hooked[finite].norm() / exact[finite].norm()).item(), 1 - finite.double().mean().item()
    ratio, nan_rows = norms['N^2']
    assert nan_rows == 0 and abs(ratio - 1) < 0.1  # S = N^2: the exact transform, but for float16
    ratio, nan_rows = norms['N^2/2']
    assert nan_rows == 0 and 1.6 < ratio < 2.4  # after one back-off: about twice the gradient
    _, nan_rows = norms['2N^2']
    assert nan_rows > 0.25  # rows whose recovered p_y went negative: NaN, and the step is skipped


def test_the_module_passes_the_baseline_and_the_loss_untouched_and_refuses_soft_targets():
    logits, labels = logits_and_labels(2)
    for alpha in (1.0, 0.3):
        leaf = logits.half().requires_grad_(True)
        loss = PublishedHookCrossEntropy(alpha, 0.1)(leaf, labels)
        reference = torch.nn.functional.cross_entropy(logits.half().double(), labels, label_smoothing=0.1)
        assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=1e-6)
        (loss * N * N).backward()
        grad = incoming_gradient(logits.half().double(), labels, N * N, 0.1)
        expected = grad if alpha == 1.0 else published_lines(grad, labels, alpha, 0.1)
        assert (leaf.grad.double() - expected.double()).abs().max() <= 2 ** -10 * expected.abs().max()  # one ulp
    with pytest.raises(ValueError, match='class-index targets'):
        PublishedHookCrossEntropy(0.3)(logits.half(), torch.softmax(logits, -1))


def test_a_float16_run_with_the_hook_skips_its_steps_until_the_scale_comes_down_to_n_squared(tiny_data, tmp_path):
    """The scaler starts at 2^16; at 32 images per rank N^2 = 2^10. Above it (from 2 N^2 on) the early network's
    rows go NaN, the step is skipped and the scale halved: exactly log2(2^16 / 2^10) = 6 skipped steps, then
    training goes on at S = N^2, where the hook is exact (up to float16)."""
    run_dir = tmp_path / 'run'
    run_main('train.py', '--config', TINY, '--data-dir', tiny_data, '--output', run_dir, '--epochs', 1,
             '--cooldown-epochs', 0, '--pgt-alpha', 0.3, '--pgt-start-epoch', 0, '--pgt-impl', 'hook', '--amp',
             '--amp-dtype', 'float16', check=True)
    [epoch] = read_summary(run_dir)
    assert int(epoch['train_skipped_steps']) == 6
    assert yaml.safe_load((run_dir / 'config.yaml').read_text())['pgt_impl'] == 'hook'


def test_the_measuring_script_reports_each_scale(tmp_path):
    out = tmp_path / 'hook.json'
    run_main('scripts/hook_vs_exact.py', '--batch', 64, '--classes', 100, '--alphas', 0.3, '--json', out, check=True)
    rows = {row['scale_over_n2']: row for row in json.loads(out.read_text())['rows']}
    assert set(rows) == {1 / 64 ** 2, 0.5, 1.0, 2.0}
    assert abs(rows[1.0]['ratio_median'] - 1) < 0.05 and abs(rows[0.5]['ratio_median'] - 2) < 0.2
    assert rows[1.0]['nan_rows'] == rows[0.5]['nan_rows'] == 0 < rows[2.0]['nan_rows']
    without_scaler = rows[1 / 64 ** 2]  # float32: the exact direction, about N^2 times too long
    assert without_scaler['cosine_min'] > 0.999 and without_scaler['ratio_median'] > 64 ** 2 / 4
