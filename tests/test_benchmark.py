"""scripts/benchmark.py in its --tiny setting: every mode runs, reports its fields, and leaves no folder behind."""
import json
import tempfile

import pytest

from conftest import run_main


def test_every_mode_reports_its_fields_and_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch):
    scratch = tmp_path / 'tmp'
    scratch.mkdir()
    out = tmp_path / 'bench.json'
    monkeypatch.setattr(tempfile, 'tempdir', str(scratch))  # where tempfile makes folders in this process
    # torch makes its compile cache under the temporary folder on first use unless this is set: pin it outside, so
    # that only what benchmark.py leaves is looked at.
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'torch-cache'))
    run_main('scripts/benchmark.py', 'all', '--tiny', '--json', out, check=True)
    assert not list(scratch.iterdir())  # the generated JPEG tree and every run folder were removed
    report = json.loads(out.read_text())
    assert {'date', 'argv', 'torch', 'results'} <= set(report)
    by_mode = {}
    for row in report['results']:
        by_mode.setdefault(row['mode'], []).append(row)
    [step] = by_mode['step']
    assert step['ce_img_per_sec'] > 0 and step['pgt_img_per_sec'] > 0 and step['timed_steps'] == 8
    assert step['ce_img_per_sec_mean'] > 0 and step['timm_like'] is False
    assert abs(step['pgt_overhead_pct'] - 100 * (step['ce_img_per_sec'] / step['pgt_img_per_sec'] - 1)) < 1e-9
    losses = {row['dtype']: row for row in by_mode['loss']}
    for row in losses.values():
        assert row['shape'] == '16x10' and row['pgt_over_ce'] == row['pgt_ms'] / row['ce_ms'] and row['ce_ms'] > 0
    assert set(losses) == {'float32', 'bfloat16'}
    assert losses['bfloat16']['ce_native_ms'] > 0 and 'ce_native_ms' not in losses['float32']  # outside autocast
    loaders = {row['backend']: row for row in by_mode['loader']}
    for backend in ('torch', 'torch-unseeded', 'reference', 'dali-cpu'):
        assert loaders[backend]['img_per_sec'] > 0, backend
        assert loaders[backend]['vs_reference'] == loaders[backend]['img_per_sec'] / loaders['reference'][
            'img_per_sec']
    assert 'error' in loaders['dali-gpu'] or loaders['dali-gpu']['img_per_sec'] > 0
    [diag] = by_mode['diagnostics']
    assert diag['probe_seconds'] > 0 and diag['overhead_pct'] == 100 * diag['probe_seconds'] / (
        diag['interval'] * diag['step_seconds'])
    e2e = {row['backend']: row for row in by_mode['e2e']}
    for backend in ('torch', 'synthetic'):
        row = e2e[backend]
        assert row['img_per_sec'] > 0 and row['fraction_of_step'] == row['img_per_sec'] / step['pgt_img_per_sec']
    startup = {row['what']: row for row in by_mode['startup']}
    assert set(startup) == {'suite-scan', 'suite-index', 'torchvision', 'timm'}
    for row in startup.values():
        assert row['images'] == 2000 and row['seconds'] > 0
        assert row['vs_torchvision'] == row['seconds'] / startup['torchvision']['seconds']
    memory = {row['what']: row for row in by_mode['startup-memory']}
    for row in memory.values():
        assert row['workers'] == 2 and 0 < row['pss_alone_mib'] < row['pss_with_workers_mib']
        assert row['per_worker_mib'] == pytest.approx((row['pss_with_workers_mib'] - row['pss_alone_mib']) / 2)


def test_timm_like_step(tmp_path):
    out = tmp_path / 'bench.json'
    run_main('scripts/benchmark.py', 'step', '--tiny', '--timm-like', '--json', out, check=True)
    [row] = json.loads(out.read_text())['results']
    assert row['timm_like'] is True and row['ce_img_per_sec'] > 0 and row['ce_img_per_sec_mean'] > 0
