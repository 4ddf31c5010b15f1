"""scripts/benchmark.py in its --tiny setting: every mode runs and reports its fields."""
import json

from conftest import run_script


def test_every_mode_reports_its_fields(tmp_path):
    out = tmp_path / 'bench.json'
    run_script('scripts/benchmark.py', 'all', '--tiny', '--json', out, check=True)
    report = json.loads(out.read_text())
    assert {'date', 'argv', 'torch', 'results'} <= set(report)
    by_mode = {}
    for row in report['results']:
        by_mode.setdefault(row['mode'], []).append(row)
    [step] = by_mode['step']
    assert step['ce_img_per_sec'] > 0 and step['pgt_img_per_sec'] > 0 and step['timed_steps'] == 8
    assert abs(step['pgt_overhead_pct'] - 100 * (step['ce_img_per_sec'] / step['pgt_img_per_sec'] - 1)) < 1e-9
    loaders = {row['backend']: row for row in by_mode['loader']}
    assert loaders['torch']['img_per_sec'] > 0 and loaders['dali-cpu']['img_per_sec'] > 0
    assert 'error' in loaders['dali-gpu'] or loaders['dali-gpu']['img_per_sec'] > 0
    [diag] = by_mode['diagnostics']
    assert diag['probe_seconds'] > 0 and diag['overhead_pct'] == 100 * diag['probe_seconds'] / (
        diag['interval'] * diag['step_seconds'])
    e2e = {row['backend']: row for row in by_mode['e2e']}
    for backend in ('torch', 'synthetic'):
        row = e2e[backend]
        assert row['img_per_sec'] > 0 and row['fraction_of_step'] == row['img_per_sec'] / step['pgt_img_per_sec']


def test_step_mode_alone(tmp_path):
    result = run_script('scripts/benchmark.py', 'step', '--tiny', '--compile', 'eager', check=True)
    assert 'mode=step' in result.stdout and 'pgt_overhead_pct=' in result.stdout
