"""reproduce.py, report.py and the non-BN ResNet-18, on real short CPU runs of the tiny set."""
import csv
import json
import subprocess

import pytest
import timm
import torch

import pgt.models  # noqa: F401
from conftest import ROOT, run_script
from pgt.runlog import read_summary

SMOKE = ROOT / 'configs' / 'smoke.yaml'


def test_reproduce_dry_run_prints_one_torchrun_command_per_table1_row():
    rows = [r for r in csv.DictReader(open(ROOT / 'configs/paper/published.csv')) if r['table'] == '1']
    result = run_script('scripts/reproduce.py', '--table', '1', '--dry-run', '--data-dir', '/data/imagenet',
                        check=True)
    commands = [line for line in result.stdout.splitlines() if line.startswith('torchrun ')]
    assert len(commands) == len(rows) == 14
    for row in rows:
        [line] = [c for c in commands if f'configs/paper/{row["row"]}.yaml' in c]
        assert f'--output runs/paper/{row["row"]}' in line and '--resume auto' in line


def test_reproduce_skips_finished_runs(tmp_path):
    run_dir = tmp_path / 'resnet18-cosine-baseline'
    run_dir.mkdir()
    rows = ['epoch,train_loss'] + [f'{e},1.0' for e in range(100)]
    (run_dir / 'summary.csv').write_text('\n'.join(rows) + '\n')
    result = run_script('scripts/reproduce.py', '--table', '1', '--dry-run', '--runs-dir', tmp_path, check=True)
    assert '# resnet18-cosine-baseline: finished, skipped' in result.stdout
    assert sum(line.startswith('torchrun') for line in result.stdout.splitlines()) == 13


def test_reproduce_slurm_script_parses(tmp_path):
    script = tmp_path / 'table2.sbatch'
    run_script('scripts/reproduce.py', '--table', '2', '--slurm', script, '--gpus', 4, check=True)
    text = script.read_text()
    assert '#SBATCH --array=0-9' in text and text.count('nobn-bs') >= 10
    assert subprocess.run(['bash', '-n', str(script)]).returncode == 0


def test_report_writes_table_and_figures(paper_pair, tiny_data, tmp_path):
    jsons = []
    for name in ('resnet18-cosine-baseline', 'resnet18-cosine-pgt'):
        result = run_script('validate.py', '--checkpoint', paper_pair / name / 'last.pth', '--data-dir', tiny_data,
                            '--json', check=True)
        jsons.append(tmp_path / f'{name}.json')
        jsons[-1].write_text(result.stdout)
    out = tmp_path / 'report'
    run_script('scripts/report.py', '--runs', paper_pair, '--out', out, '--validate-json', *jsons, check=True)
    report = (out / 'report.md').read_text()
    table_rows = [line for line in report.splitlines() if line.startswith('| resnet18-cosine-')]
    assert len(table_rows) == 2
    pgt_row = next(r for r in table_rows if r.startswith('| resnet18-cosine-pgt '))
    cells = [c.strip() for c in pgt_row.strip('|').split('|')]
    assert cells[2] == '0.3' and cells[8] == '70.30'  # alpha, and the published test top-1 of this row
    baseline_test = float(json.loads(jsons[0].read_text())['top1'])
    assert float(cells[9]) == pytest.approx(float(cells[5]) - baseline_test, abs=0.011)  # Δ baseline
    for figure in ('fig3-resnet18-cosine-pgt.png', 'fig6-logit_norm-vs-alpha.png', 'fig6-loss-vs-alpha.png',
                   'fig6-loss-vs-logit-norm.png'):
        assert (out / figure).stat().st_size > 1000, figure


def test_nobn_resnet18_has_no_normalisation_layer():
    model = timm.create_model('resnet18_nobn', num_classes=10)
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    assert not [name for name, m in model.named_modules() if isinstance(m, norm_types)]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20 and all(c.bias is None for c in convs)  # as published: timm's bias-free convolutions
    reference = timm.create_model('resnet18', num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in reference.named_parameters() if 'bn' not in n and 'downsample.1' not in n)


def test_nobn_resnet18_trains_on_the_tiny_set(tiny_data, tmp_path):
    # As the Table 2 row nobn-bs256-agc-pgt trains it: PGT with adaptive gradient clipping (factor 0.01). Without
    # normalisation the residual branches add up at full scale, and plain SGD at this size oscillates.
    run_script('train.py', '--config', SMOKE, '--data-dir', tiny_data, '--output', tmp_path / 'nobn',
               '--model', 'resnet18_nobn', '--lr', 0.02, '--epochs', 3, '--cooldown-epochs', 0, '--warmup-epochs', 0,
               '--pgt-alpha', 0.25, '--pgt-start-epoch', 0, '--clip-mode', 'agc', '--clip-grad', 0.01, check=True)
    losses = [float(r['train_loss']) for r in read_summary(tmp_path / 'nobn')]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0] and losses[-1] < 0.8 * losses[0], losses
