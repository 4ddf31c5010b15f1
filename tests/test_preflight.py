"""scripts/preflight.py on this machine: the CPU subset of its checks, a table, and every CUDA check named as skipped
with its reason (the CUDA checks themselves run in tests/test_cuda.py on a GPU node)."""
import re

import torch

from conftest import ROOT, run_main

CUDA_CHECKS = ('cuda: float16 + gradient scaler', 'cuda: bfloat16', 'cuda: fused SGD', 'cuda: channels-last',
               'cuda: torch.compile', 'cuda: NCCL + gloo all-reduce', 'cuda: DALI GPU decoding')


def table(stdout: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in stdout.splitlines():
        match = re.match(r'^(\S.*?)\s{2,}(pass|fail|warn|skip)\s{2,}(.*)$', line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def test_preflight_runs_the_cpu_subset_and_names_what_it_skipped(tiny_data):
    result = run_main('scripts/preflight.py', '--config', ROOT / 'configs' / 'smoke.yaml', '--data-dir', tiny_data)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = table(result.stdout)
    assert rows['data: tree'] == ('warn', 'train 10 classes, 320 images; val 10 classes, 80 images; ImageNet-1k has '
                                          "1000 classes, 1,281,167 train and 50,000 val images (fine for a subset, "
                                          "not for the papers' numbers)")
    assert rows['data: decoding'] == ('pass', '64 random training files decoded')
    if not torch.cuda.is_available():
        for name in CUDA_CHECKS:
            assert rows[name] == ('skip', 'no CUDA device on this machine'), name
        assert f'{len(CUDA_CHECKS)} check(s) skipped' in result.stdout
    step = re.fullmatch(r'([\d,]+) img/s \(resnet18, batch 32, 32 px, on cpu\)', rows['speed: training step'][1])
    loader = re.fullmatch(r'([\d,]+) img/s \(torch backend, 2 workers\)', rows['speed: loader'][1])
    assert step and loader and rows['speed: training step'][0] == rows['speed: loader'][0] == 'pass'
    rate = min(int(step.group(1).replace(',', '')), int(loader.group(1).replace(',', '')))
    projection = re.fullmatch(r'6 epochs x 320 images at ([\d,]+) img/s per CPU \((step|loader)-bound\): '
                              r'([\d.]+) CPU-hours', rows['projection'][1])
    assert projection and int(projection.group(1).replace(',', '')) == rate
    assert abs(float(projection.group(3)) - 6 * 320 / rate / 3600) < 0.006  # printed to 2 decimals


def test_a_broken_image_fails_the_decoding_check(tiny_data, tmp_path):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    for path in (data / 'train').glob('*/*.JPEG'):  # every file, so that the random sample meets one
        path.write_bytes(path.read_bytes()[:100])
    result = run_main('scripts/preflight.py', '--config', ROOT / 'configs' / 'smoke.yaml', '--data-dir', data)
    assert result.returncode == 1
    status, detail = table(result.stdout)['data: decoding']
    assert status == 'fail' and detail.startswith(f'cannot decode {data}/train/')


def test_a_paper_recipe_on_a_cpu_is_measured_at_a_batch_the_cpu_holds(tiny_data):
    """The recipe's 1024 per step would take minutes per step and gigabytes on a CPU: the step and the loader are
    measured at 32, saying so, and the projection still comes."""
    recipe = ROOT / 'configs' / 'paper' / 'resnet18-cosine-pgt.yaml'
    result = run_main('scripts/preflight.py', '--config', recipe, '--data-dir', tiny_data, '--img-size', 32,
                      '--workers', 0, '--no-amp')  # bfloat16 on a CPU without AMX: seconds per step
    rows = table(result.stdout)
    assert rows['speed: training step'][0] == 'pass', result.stdout
    assert re.fullmatch(r"[\d,]+ img/s \(resnet18, batch 32, 32 px, on cpu; batch 32, not the recipe's 1024: a CPU "
                        r"measures at a small batch\)", rows['speed: training step'][1])
    assert rows['speed: loader'][0] == 'pass' and rows['projection'][0] == 'pass'
    assert re.fullmatch(r'100 epochs x 320 images at [\d,]+ img/s per CPU \((step|loader)-bound\): [\d.]+ CPU-hours',
                        rows['projection'][1])
