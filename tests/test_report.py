"""scripts/report.py and the figures: statistics over seeds against an independent computation, rows filled from a
shared run, incomplete rows marked, and the figures' panels, axes and labels read through matplotlib."""
import csv
import math
import re
import statistics

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import stats

from conftest import PAPER_PAIR
from pgt import report
from pgt.errors import UsageError
from pgt.plots import (accuracy_curves_figure, alpha_sweep_figure, filter_norms_figure, grid_figure, save_figure,
                       zeroed_filters_figure)
from pgt.runlog import read_summary


def synthetic_run(run_dir, train, test, epochs=100, classes=1000, model='resnet18', alpha=None, seed=0):
    """A run folder as train.py writes it: summary.csv whose last row holds the chosen final top-1 values (earlier
    epochs lower, so the final epoch is also the best), and config.yaml."""
    run_dir.mkdir(parents=True)
    with open(run_dir / 'summary.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['epoch', 'train_loss', 'train_top1', 'eval_loss', 'eval_top1',
                                               'eval_top5', 'lr'])
        writer.writeheader()
        for e in range(epochs):
            ahead = epochs - 1 - e
            writer.writerow({'epoch': e, 'train_loss': 1.0, 'train_top1': train - ahead * 0.1, 'eval_loss': 1.2,
                             'eval_top1': test - ahead * 0.1, 'eval_top5': test + 20 - ahead * 0.1, 'lr': 0.1})
    config = {'model': model, 'num_classes': classes, 'seed': seed, **({'pgt_alpha': alpha} if alpha else {})}
    (run_dir / 'config.yaml').write_text(yaml.safe_dump(config))


SEEDED = {  # row: (model, alpha, {seed: (final train top-1, final test top-1)})
    'resnet18-cosine-baseline': ('resnet18', None, {0: (70.3, 70.1), 1: (70.5, 70.25), 2: (70.6, 70.4)}),
    'resnet18-cosine-pgt': ('resnet18', 0.25, {0: (70.6, 70.3), 1: (70.4, 70.32), 2: (70.9, 70.55)}),
    'resnet50-cosine-baseline': ('resnet50', None, {0: (79.0, 76.5), 1: (79.2, 76.6), 2: (79.1, 76.55)}),
    'resnet50-cosine-pgt': ('resnet50', 0.05, {3: (79.8, 77.9), 4: (79.9, 78.0)}),
    'seresnet18-cosine-baseline': ('seresnet18', None, {0: (71.4, 71.0)}),
    'seresnet18-cosine-pgt': ('seresnet18', 0.25, {0: (71.7, 71.5)}),
}


@pytest.fixture(scope='module')
def synthetic_report(tmp_path_factory):
    runs, out = tmp_path_factory.mktemp('runs'), tmp_path_factory.mktemp('report')
    for row, (model, alpha, seeds) in SEEDED.items():
        for seed, (train, test) in seeds.items():
            synthetic_run(runs / row / f'seed{seed}', train, test, model=model, alpha=alpha, seed=seed)
    synthetic_run(runs / 'resnet50-step-baseline', 79.0, 76.0, model='resnet50', seed=42)  # single-seed layout
    synthetic_run(runs / 'resnet101-cosine-baseline', 70.0, 60.0, epochs=10, model='resnet101')
    synthetic_run(runs / 'resnet101-cosine-pgt', 90.0, 88.0, classes=10, model='resnet101', alpha=0.3)
    for alpha, (train, test) in {0.1: (71.0, 69.5), 0.25: (70.8, 69.9), 1.0: (70.0, 69.6)}.items():
        synthetic_run(runs / f'grid-resnet18-alpha{alpha:g}', train, test, epochs=50, alpha=alpha)
    assert report.main(['--runs', str(runs), '--out', str(out)]) == 0
    return out


def read_csv(path):
    with open(path, newline='') as f:
        return {row['row']: row for row in csv.DictReader(f)}


def expected_interval(pgt: dict, base: dict):
    """The 95% interval of PGT - baseline from the definitions: paired when the seeds are the same, else Welch."""
    if set(pgt) == set(base):
        d = [pgt[s] - base[s] for s in sorted(pgt)]
        half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
        return statistics.mean(d) - half, statistics.mean(d) + half, 'paired'
    a, b = list(pgt.values()), list(base.values())
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    nu = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    half = stats.t.ppf(0.975, nu) * math.sqrt(va + vb)
    diff = statistics.mean(a) - statistics.mean(b)
    return diff - half, diff + half, 'Welch'


def test_means_and_spreads_over_seeds(synthetic_report):
    results = read_csv(synthetic_report / 'results.csv')
    for row, (_, _, seeds) in SEEDED.items():
        got = results[row]
        tests, trains = [t for _, t in seeds.values()], [t for t, _ in seeds.values()]
        assert int(got['n_seeds']) == len(seeds) and got['seeds'] == ' '.join(map(str, seeds))
        assert float(got['test_top1_mean']) == pytest.approx(statistics.mean(tests), abs=1e-9)
        assert float(got['train_top1_mean']) == pytest.approx(statistics.mean(trains), abs=1e-9)
        assert float(got['best_test_top1_mean']) == pytest.approx(statistics.mean(tests), abs=1e-9)
        if len(seeds) > 1:
            assert float(got['test_top1_std']) == pytest.approx(statistics.stdev(tests), abs=1e-9)
        assert float(got['gap_mean']) == pytest.approx(statistics.mean(trains) - statistics.mean(tests), abs=1e-9)


@pytest.mark.parametrize('row,baseline,published_inside', [
    ('resnet18-cosine-pgt', 'resnet18-cosine-baseline', True),  # paired by seed; the published +0.09 inside
    ('resnet50-cosine-pgt', 'resnet50-cosine-baseline', False),  # Welch (other seeds); the published +0.656 outside
])
def test_differences_with_their_95_percent_intervals(synthetic_report, row, baseline, published_inside):
    got = read_csv(synthetic_report / 'differences.csv')[row]
    pgt = {s: t for s, (_, t) in SEEDED[row][2].items()}
    base = {s: t for s, (_, t) in SEEDED[baseline][2].items()}
    low, high, method = expected_interval(pgt, base)
    assert got['method'] == method and got['baseline'] == baseline
    assert float(got['delta_test']) == pytest.approx(statistics.mean(pgt.values()) - statistics.mean(base.values()),
                                                     abs=1e-9)
    assert float(got['delta_test_low']) == pytest.approx(low, abs=1e-9)
    assert float(got['delta_test_high']) == pytest.approx(high, abs=1e-9)
    assert got['published_inside'] == str(published_inside)
    published = {'resnet18-cosine-pgt': 70.298 - 70.208, 'resnet50-cosine-pgt': 77.216 - 76.56}[row]
    assert float(got['published_delta_test']) == pytest.approx(published, abs=1e-9)
    assert (low <= published <= high) == published_inside  # the chosen numbers make one case of each


def test_one_seed_gives_a_difference_without_an_interval(synthetic_report):
    got = read_csv(synthetic_report / 'differences.csv')['seresnet18-cosine-pgt']
    assert got['method'] == 'one seed' and got['delta_test_low'] == 'nan'
    assert float(got['delta_test']) == pytest.approx(0.5, abs=1e-9) and got['published_inside'] == ''
    text = (synthetic_report / 'report.md').read_text()
    assert '| seresnet18-cosine-pgt | seresnet18-cosine-baseline | 1, 1 | +0.300 | +0.500 (one seed: no interval) | ' \
           'none (one seed) | +0.346 | – |' in text


def markdown_rows(text, name):
    return [[c.strip() for c in line.strip('|').split('|')] for line in text.splitlines()
            if line.startswith(f'| {name} |')]


def test_markdown_has_three_decimals_gaps_and_the_paper(synthetic_report):
    text = (synthetic_report / 'report.md').read_text()
    cells = markdown_rows(text, 'resnet18-cosine-pgt')[0]
    tests, trains = [t for _, t in SEEDED['resnet18-cosine-pgt'][2].values()], [
        t for t, _ in SEEDED['resnet18-cosine-pgt'][2].values()]
    assert cells[:6] == ['resnet18-cosine-pgt', 'resnet18', '0.25', 'exact, timm', '0 1 2', '100/100']
    assert cells[6] == f'{statistics.mean(trains):.3f} ± {statistics.stdev(trains):.3f}'
    assert cells[7] == f'{statistics.mean(tests):.3f} ± {statistics.stdev(tests):.3f}'
    assert cells[9:11] == [f'{statistics.mean(tests) + 20:.3f}', '1.200']  # final top-5 and loss
    assert cells[11] == f'{statistics.mean(trains) - statistics.mean(tests):.3f}'  # gap
    assert cells[12:15] == ['70.530', '70.298', f'{70.53 - 70.298:.3f}']  # paper train, test, gap
    assert cells[15] == f'{statistics.mean(tests) - 70.298:+.3f}' and cells[16] == 'complete'
    low, high, _ = expected_interval({s: t for s, (_, t) in SEEDED['resnet18-cosine-pgt'][2].items()},
                                     {s: t for s, (_, t) in SEEDED['resnet18-cosine-baseline'][2].items()})
    diff_cells = markdown_rows(text, 'resnet18-cosine-pgt')[1]
    assert diff_cells[4].endswith(f'[{low:+.3f}, {high:+.3f}]') and diff_cells[5:] == ['paired by seed', '+0.090',
                                                                                     'inside']


def test_table3_rows_are_filled_from_the_runs_they_share(synthetic_report):
    results = read_csv(synthetic_report / 'results.csv')
    shared = results['table3-row1-resnet50-step-baseline']
    assert shared['run'] == 'resnet50-step-baseline' and shared['table'] == '3'
    for key in ('test_top1_mean', 'train_top1_mean', 'seeds'):
        assert shared[key] == results['resnet50-step-baseline'][key]
    assert shared['seeds'] == '42'  # the single-seed layout counts as one seed, the recipe's


def test_incomplete_and_other_data_rows_are_marked_and_get_no_difference_to_the_paper(synthetic_report):
    results = read_csv(synthetic_report / 'results.csv')
    assert results['resnet101-cosine-baseline']['status'] == 'incomplete: 10 of 100 epochs'
    assert results['resnet101-cosine-pgt']['status'] == "not the paper's data: 10 classes, not 1000"
    assert results['resnet101-cosine-baseline']['delta_paper_best_test'] == ''
    assert results['resnet101-cosine-pgt']['delta_paper_best_test'] == ''
    text = (synthetic_report / 'report.md').read_text()
    assert markdown_rows(text, 'resnet101-cosine-baseline')[0][15:] == ['–', 'incomplete: 10 of 100 epochs']
    # Against each other they still get a difference with its interval, but no verdict on the published one.
    assert read_csv(synthetic_report / 'differences.csv')['resnet101-cosine-pgt']['published_inside'] == ''
    assert markdown_rows(text, 'resnet101-cosine-pgt')[1][-1] == '–'


def test_grid_section_and_figure(synthetic_report):
    text = (synthetic_report / 'report.md').read_text()
    assert '### resnet18' in text
    assert '| grid-resnet18-alpha0.25 | 0.25 | exact, timm | 1 | 70.800 | 69.900 | 0.900 |' in text
    for suffix in ('png', 'pdf'):
        assert (synthetic_report / f'fig2-alpha.{suffix}').stat().st_size > 1000


# ---- the figures, inspected before they are saved

def summary_rows(train, test, epochs=12):
    return [{'epoch': e, 'train_top1': train * (e + 1) / epochs, 'eval_top1': test * (e + 1) / epochs}
            for e in range(epochs)]


def test_fig3_log_axes_integer_epochs_bands_reference_lines_and_outside_legend(tmp_path):
    curves = {'baseline': [summary_rows(70, 69), summary_rows(71, 69.5)], 'pgt': [summary_rows(72, 70)]}
    fig = accuracy_curves_figure(curves, 'pgt against baseline', {'baseline': {'train_acc': 70.38,
                                                                                'test_acc': 70.208}})
    axes = fig.axes
    assert [ax.get_title(loc='left') for ax in axes] == ['(a)', '(b)']
    # The papers' log-log axes, with epochs from 0 as summary.csv numbers them (symmetric-log: linear below 1).
    assert all(ax.get_xscale() == 'symlog' and ax.get_yscale() == 'log' for ax in axes)
    assert [t for t in axes[0].get_xticks()] == [0, 1, 2, 5, 10] and axes[0].get_xlabel() == 'epoch'
    assert list(axes[0].lines[0].get_xdata()) == list(range(12))  # the rows' own epoch numbers
    assert axes[0].get_ylabel() == 'train top-1 (%)' and axes[1].get_ylabel() == 'test top-1 (%)'
    assert len(axes[1].collections) == 1  # one band: the row with two seeds
    assert [line.get_ydata()[0] for line in axes[1].lines if line.get_linestyle() == '--'] == [70.208]
    assert fig.legends and all(ax.get_legend() is None for ax in axes)  # the legend is the figure's, not over data
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert 'baseline (2 seeds)' in labels and 'baseline: published' in labels
    paths = save_figure(fig, tmp_path / 'fig3')
    assert [p.suffix for p in paths] == ['.png', '.pdf'] and all(p.stat().st_size > 1000 for p in paths)
    assert round(Image.open(paths[0]).info['dpi'][0]) == 200


def test_fig6_one_figure_of_three_panels_with_alpha_labels_and_r2():
    results = [{'pgt_alpha': a, 'logit_norm': n, 'loss': loss} for a, n, loss in
               ((0.1, 40.0, 2.9), (0.3, 30.0, 2.1), (0.6, 20.0, 1.55), (None, 10.0, 0.8))]
    fig, (slope, intercept, r2) = alpha_sweep_figure(results)
    norm, loss = np.array([40.0, 30, 20, 10]), np.array([2.9, 2.1, 1.55, 0.8])
    assert r2 == pytest.approx(np.corrcoef(norm, loss)[0, 1] ** 2, abs=1e-12)
    assert slope == pytest.approx(np.polyfit(norm, loss, 1)[0], abs=1e-12)
    assert [ax.get_title(loc='left') for ax in fig.axes] == ['(a)', '(b)', '(c)']
    assert [ax.get_xlabel() for ax in fig.axes] == ['alpha', 'alpha', 'mean logit L2 norm']
    assert sorted(t.get_text() for t in fig.axes[2].texts) == ['α=0.1', 'α=0.3', 'α=0.6', 'α=1']
    [fit] = [t.get_text() for t in fig.legends[0].get_texts()]
    assert re.fullmatch(rf'y = {slope:.4g} x \+ {intercept:.4g} \(R² = {r2:.3f}\)', fit)


def test_fig2_and_fig5_panels():
    fig = grid_figure({'resnet18': [(0.1, 71.0, 69.5), (1.0, 70.0, 69.6)], 'resnet50': [(0.3, 79.0, 77.0),
                                                                                         (1.0, 78.5, 76.6)]})
    main_axes = [ax for ax in fig.axes if ax.get_title(loc='left')]
    assert [ax.get_title(loc='left') for ax in main_axes] == ['(a)', '(b)']
    assert [t.get_text() for t in main_axes[0].get_xticklabels()] == ['0.1', '1']
    series = {'layer11': (np.array([0, 10]), np.ones((2, 4))), 'pooled': (np.array([0, 10]), np.zeros((2, 3)))}
    fig5 = filter_norms_figure({'baseline': series, 'pgt': series})
    assert [ax.get_title(loc='left') for ax in fig5.axes] == ['(a)', '(b)', '(c)', '(d)']
    assert fig5.axes[0].get_ylabel() == 'layer11 filter norm' and fig5.axes[1].get_ylabel() == 'pooled feature norm'
    assert len(fig5.axes[0].lines) == 4  # a line per filter


def test_fig4_marks_and_counts_the_zeroed_out_filters():
    norms = {'baseline': np.array([0.5, 0.0, 0.7, 0.0, 0.3, 1e-7, 0.2]), 'pgt': np.linspace(0.1, 0.9, 7)}
    fig = zeroed_filters_figure(norms, 'layer1.0.conv1.weight', eps=1e-5)
    panels = [ax for ax in fig.axes if ax.get_title(loc='left')]
    assert [ax.get_title(loc='left') for ax in panels] == ['(a)', '(b)']
    assert [ax.get_xlabel() for ax in panels] == ['baseline: 3 of 7 filters zeroed out',
                                                  'pgt: 0 of 7 filters zeroed out']
    marked = panels[0].collections[0].get_offsets()  # the crosses, at (column, row) of a 3 x 3 grid
    assert sorted(map(tuple, np.asarray(marked).tolist())) == [(0.0, 1.0), (1.0, 0.0), (2.0, 1.0)]
    image = np.ma.filled(panels[0].images[0].get_array().astype(float), np.nan)
    assert image.shape == (3, 3) and image[0, 0] == 0.5 and image[2, 0] == pytest.approx(0.2)
    assert np.isnan(image[2, 1:]).all()  # no filter in the last two cells


# ---- real CPU runs: two seeds of a baseline and a PGT row, with diagnostics

def test_report_of_real_runs_with_two_seeds_each(paper_runs, tmp_path):
    out = tmp_path / 'report'
    assert report.main(['--runs', str(paper_runs), '--out', str(out)]) == 0
    text = (out / 'report.md').read_text()
    for row in PAPER_PAIR:
        cells = markdown_rows(text, row)[0]
        assert cells[4] == '0 1' and cells[5] == '2/100'
        assert cells[16] == "incomplete: 2 of 100 epochs; not the paper's data: 10 classes, not 1000"
        assert cells[15] == '–'  # no difference to the paper for a 2-epoch, 10-class run
    assert markdown_rows(text, 'resnet18-cosine-pgt')[1][-2:] == ['+0.090', '–']  # the published Δ, no verdict
    assert 'paired by seed' in markdown_rows(text, 'resnet18-cosine-pgt')[1]
    # Fig. 2-6 from the runs' own files, with no other input: alpha 1 and 0.3 of one model and schedule for Fig. 2
    # and 6, the curves (3), last.pth (4), the diagnostics' filter norms (5).
    for figure in ('fig2-alpha', 'fig3-resnet18-cosine-pgt', 'fig4-resnet18-cosine-pgt', 'fig5-resnet18-cosine-pgt',
                   'fig6-test_resnet-0'):
        assert (out / f'{figure}.png').stat().st_size > 1000 and (out / f'{figure}.pdf').is_file(), figure
        assert f'![{figure}]({figure}.png)' in text
    assert all(markdown_rows(text, row)[0][3] == 'exact, timm, lr 0.1' for row in PAPER_PAIR)
    [conditioning] = [r for r in markdown_rows(text, 'resnet18-cosine-pgt') if len(r) == 9]  # seed 0's diagnostics
    with open(paper_runs / 'resnet18-cosine-pgt' / 'seed0' / 'diagnostics.csv', newline='') as f:
        probes = list(csv.DictReader(f))
    assert conditioning[1:3] == ['0.3', str(len(probes))]
    assert conditioning[3] == f"{statistics.mean(float(p['step_consistency']) for p in probes):.3f}"
    assert conditioning[7:] == [probes[-1]['zeroed_filters'], probes[-1]['dead_pooled_features']]
    with open(paper_runs / 'resnet18-cosine-pgt' / 'seed0' / 'filter_norms.csv', newline='') as f:
        series = {row['series'] for row in csv.DictReader(f)}
    assert series == {'layer11', 'layer15', 'pooled'}


def test_any_run_is_reported_with_its_figures_and_without_the_papers_numbers(straight_run, paper_runs, tmp_path):
    """One run directory (the smoke recipe's, here the tiny one), and a folder holding it beside a paper pair."""
    out = tmp_path / 'one'
    assert report.main(['--runs', str(straight_run), '--out', str(out)]) == 0
    text = (out / 'report.md').read_text()
    [cells] = markdown_rows(text, 'run')
    rows = read_summary(straight_run)
    assert cells[:6] == ['run', 'test_resnet', '0.3', 'exact, timm, lr 0.1', '0', '2/2'] and len(cells) == 13
    assert cells[7] == f"{float(rows[-1]['eval_top1']):.3f}" and cells[12] == 'not a row of the papers: no comparison'
    assert cells[9:11] == [f"{float(rows[-1]['eval_top5']):.3f}", f"{float(rows[-1]['eval_loss']):.3f}"]
    assert 'Other runs (not named after a row of the paper tier: no comparison with the papers)' in text
    assert (out / 'fig3-run.png').stat().st_size > 1000 and '![fig3-run](fig3-run.png)' in text
    both = tmp_path / 'runs'
    both.mkdir()
    for row in PAPER_PAIR:
        (both / row).symlink_to(paper_runs / row, target_is_directory=True)
    (both / 'smoke-20261204-101500').symlink_to(straight_run, target_is_directory=True)
    assert report.main(['--runs', str(both), '--out', str(tmp_path / 'both')]) == 0
    text = (tmp_path / 'both' / 'report.md').read_text()
    assert markdown_rows(text, 'smoke-20261204-101500')[0][12] == 'not a row of the papers: no comparison'
    assert len(markdown_rows(text, 'resnet18-cosine-pgt')[0]) == 17  # the paper's columns for the paper rows


def published_code_run(folder, rows):
    """A run folder as the published train.py leaves it: args.yaml (its parser's keys) and summary.csv (epochs from
    1; train_acc; eval loss, top-1 and top-5)."""
    folder.mkdir(parents=True)
    (folder / 'args.yaml').write_text(yaml.safe_dump({'model': 'resnet18', 'sched': 'cosine', 'lr': 0.1,
                                                      'batch_size': 256, 'modify_softmax': 0.25, 'smoothing': 0.0,
                                                      'epochs': 90, 'cooldown_epochs': 10}))
    with open(folder / 'summary.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['epoch', 'train_loss', 'train_acc', 'eval_loss', 'eval_top1',
                                               'eval_top5'])
        writer.writeheader()
        for epoch, (top1, top5) in enumerate(rows, start=1):
            writer.writerow({'epoch': epoch, 'train_loss': 1.0, 'train_acc': 70.0, 'eval_loss': 1.2,
                             'eval_top1': top1, 'eval_top5': top5})


def test_published_code_runs_and_each_runs_setup_are_reported_with_the_best_epoch_against_the_paper(tmp_path):
    runs, out = tmp_path / 'runs', tmp_path / 'report'
    synthetic_run(runs / 'resnet18-cosine-pgt', 71.0, 70.0, alpha=0.25)
    config = yaml.safe_load((runs / 'resnet18-cosine-pgt' / 'config.yaml').read_text())
    config.update(pgt_impl='hook', schedule_origin='fork', lr=0.1)
    (runs / 'resnet18-cosine-pgt' / 'config.yaml').write_text(yaml.safe_dump(config))
    with open(runs / 'resnet18-cosine-pgt' / 'summary.csv', 'a', newline='') as f:  # a last epoch below the best
        f.write('100,1.0,71.0,1.3,69.5,89.0,0.0004\n')
    published = tmp_path / 'published' / 'cosine-alpha-0.25'
    published_code_run(published, [(60.0, 80.0), (70.4, 89.6), (70.1, 89.4)])
    assert report.main(['--runs', str(runs), '--out', str(out), '--published-run',
                        f'resnet18-cosine-pgt={published}']) == 0
    text = (out / 'report.md').read_text()
    ours, theirs = markdown_rows(text, 'resnet18-cosine-pgt')[:2]
    best = max(float(r['eval_top1']) for r in read_summary(runs / 'resnet18-cosine-pgt'))
    assert ours[3] == 'hook, fork, lr 0.1' and ours[7] == '69.500' and ours[8] == f'{best:.3f}'
    assert ours[15] == f'{best - 70.298:+.3f}'  # Δ paper from the best epoch, as the published code kept model_best
    assert theirs == ['resnet18-cosine-pgt', 'resnet18', '0.25', '0.1', '256', '3', '70.100', '70.400', '89.400',
                      '70.298', f'{70.4 - 70.298:+.3f}', 'none']
    [row] = read_csv(out / 'published_runs.csv').values()
    assert float(row['best_test_top1']) == 70.4 and row['folder'] == str(published)
    with pytest.raises(UsageError, match=r'--published-run resnet18-cosine-pgt=.*args.yaml not found'):
        report.main(['--runs', str(runs), '--out', str(out), '--published-run', f'resnet18-cosine-pgt={tmp_path}'])
    with pytest.raises(UsageError, match='expected ROW=DIR with ROW a row of the tier'):
        report.main(['--runs', str(runs), '--out', str(out), '--published-run', f'no-such-row={published}'])


def test_a_folder_without_runs_is_one_line(tmp_path):
    with pytest.raises(UsageError, match=f'{tmp_path}: no run in it'):
        report.main(['--runs', str(tmp_path), '--out', str(tmp_path / 'out')])


def test_the_budget_tier_has_its_own_tables_without_the_papers_columns(tmp_path):
    runs, out = tmp_path / 'runs', tmp_path / 'report'
    for row, (model, alpha, seeds) in list(SEEDED.items())[:2]:
        for seed, (train, test) in seeds.items():
            synthetic_run(runs / row / f'seed{seed}', train, test, epochs=20, model=model, alpha=alpha, seed=seed)
    assert report.main(['--runs', str(runs), '--out', str(out), '--tier', 'budget']) == 0
    text = (out / 'report.md').read_text()
    assert text.startswith('# PGT reproduction report (budget tier)') and 'paper test' not in text
    assert 'published Δ' not in text and 'Δ paper' not in text
    cells = markdown_rows(text, 'resnet18-cosine-pgt')[0]
    assert cells[5] == '20/20' and cells[-1] == 'complete'
    assert 'paired by seed' in markdown_rows(text, 'resnet18-cosine-pgt')[1]
