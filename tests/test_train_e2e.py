"""train.py and validate.py end to end on the generated tiny set, on the CPU, through their command lines."""
import argparse
import json
import math
import os
import re
import shutil
import subprocess

import pytest
import timm
import timm.data
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.utils import CheckpointSaver

from conftest import BASE, ROOT, SMOKE, TINY, copy_run, run_main, run_script, torchrun_command, train_in_process
from pgt.plots import accuracy_curves_figure
from pgt.runlog import read_summary


@pytest.fixture(scope='module')
def smoke_run(tiny_data, tmp_path_factory):
    """The smoke recipe's 6 epochs, on timm's test_resnet (tests/tiny.yaml). The smoke recipe itself, ResNet-18, is
    trained by first_run.sh, which CI runs first, and by the GPU acceptance run (test_cuda.py)."""
    run_dir = tmp_path_factory.mktemp('smoke') / 'run'
    train_in_process('--config', TINY, '--data-dir', tiny_data, '--output', run_dir)
    return run_dir


def test_smoke_writes_every_artifact(smoke_run):
    for name in ('summary.csv', 'last.pth', 'best.pth', 'config.yaml'):
        assert (smoke_run / name).is_file(), name
    rows = read_summary(smoke_run)
    assert [int(r['epoch']) for r in rows] == list(range(6))  # 5 epochs + 1 cooldown epoch
    for row in rows:
        for key in ('train_loss', 'train_top1', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'train_img_per_sec'):
            assert math.isfinite(float(row[key])), (key, row)


def test_smoke_learns_well_above_chance(smoke_run):
    # Chance is 10% (10 classes, 80 validation images). The classes differ in hue and stripe angle and the run ends
    # at or near 100%; a broken label mapping or a model that does not learn stays near 10%, and 80 guesses at 10%
    # reach 60% with probability below 1e-20, so the bound cannot pass by luck and leaves room for noise.
    assert float(read_summary(smoke_run)[-1]['eval_top1']) >= 60.0


def test_tensorboard_holds_train_and_eval_scalars(smoke_run):
    events = EventAccumulator(str(smoke_run / 'tb'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'train/loss', 'train/top1', 'train/lr', 'eval/loss', 'eval/top1', 'eval/top5'} <= tags
    assert len(events.Scalars('eval/top1')) == 6
    logged = [float(r['eval_top1']) for r in read_summary(smoke_run)]
    assert [e.value for e in events.Scalars('eval/top1')] == pytest.approx(logged, abs=1e-4)


def test_validate_reproduces_logged_top1_of_best_epoch(smoke_run, tiny_data):
    result = run_main('validate.py', '--checkpoint', smoke_run / 'best.pth', '--data-dir', tiny_data, '--json',
                      check=True)
    metrics = json.loads(result.stdout)
    rows = read_summary(smoke_run)
    best_row = rows[metrics['epoch']]
    assert float(best_row['eval_top1']) == max(float(r['eval_top1']) for r in rows)
    assert metrics['top1'] == pytest.approx(float(best_row['eval_top1']), abs=1e-6)
    assert metrics['loss'] == pytest.approx(float(best_row['eval_loss']), rel=1e-5)
    assert metrics['images'] == 80 and {'top5', 'logit_norm'} <= set(metrics)


def test_resolved_config_reproduces_the_run_configuration(smoke_run):
    result = run_main('train.py', '--config', smoke_run / 'config.yaml', '--dry-run', check=True)
    again = run_main('train.py', '--config', TINY, '--dry-run', check=True)
    resolved, original = result.stdout.splitlines(), again.stdout.splitlines()
    differing = set(resolved) ^ set(original)
    # Filled in at run time: the classes from the data, --amp-dtype auto once the device is known.
    assert differing == {'num_classes: 10', 'amp_dtype: bfloat16', 'amp_dtype: auto'}, differing


def test_resume_after_an_epoch_gives_the_same_rows(first_epoch_run, straight_run, tiny_data, tmp_path):
    run_dir = copy_run(first_epoch_run, tmp_path / 'split')
    assert len(read_summary(run_dir)) == 1
    run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, '--resume', 'auto', check=True)
    straight, split = read_summary(straight_run), read_summary(run_dir)
    assert len(straight) == len(split) == 2
    for a, b in zip(straight, split):
        for key in ('train_loss', 'eval_loss', 'lr'):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-5), (a['epoch'], key)
        assert a['train_top1'] == b['train_top1'] and a['eval_top1'] == b['eval_top1']


@pytest.mark.slow
def test_two_process_ddp_run(tiny_data, tmp_path):
    run_dir = tmp_path / 'ddp'
    result = subprocess.run(torchrun_command('--config', TINY, '--data-dir', tiny_data, '--output', run_dir,
                                             '--epochs', 1, '--cooldown-epochs', 0, '--pgt-start-epoch', 0,
                                             '--global-batch-size', 32),
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(run_dir)
    assert len(rows) == 1 and math.isfinite(float(rows[0]['train_loss']))
    assert int(rows[0]['eval_images']) == 80  # every validation image once over the two ranks, no padding
    assert not (run_dir / 'summary.csv.1').exists() and len(list(run_dir.glob('*.csv'))) == 1


# ---- bad input: exit code 2, one line on stderr, no traceback, nothing already on disk lost
@pytest.fixture
def previous_run(tmp_path):
    """An output folder holding files of an earlier run, which no failing command may change."""
    folder = tmp_path / 'earlier'
    folder.mkdir()
    (folder / 'notes.txt').write_text('keep me')
    return folder


def assert_clean_failure(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr, result.stderr[-2000:]
    error_lines = [line for line in lines if line.startswith('error: ')]
    assert len(error_lines) == 1, lines
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def unchanged(folder):
    return sorted(p.name for p in folder.iterdir()) == ['notes.txt'] and (folder / 'notes.txt').read_text() == 'keep me'


def test_missing_data_dir(tmp_path, previous_run):
    result = run_main('train.py', '--config', SMOKE, '--data-dir', tmp_path / 'nowhere', '--output', previous_run)
    assert_clean_failure(result, 'data directory not found', 'nowhere')
    assert (previous_run / 'notes.txt').read_text() == 'keep me'


def test_split_without_class_folders(tmp_path, tiny_data):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data / 'train', data / 'train')
    (data / 'val').mkdir()
    result = run_main('train.py', '--config', SMOKE, '--data-dir', data, '--output', tmp_path / 'run')
    assert_clean_failure(result, 'val', 'no class folders')


def test_corrupt_jpeg_with_strict_data_names_the_file(tmp_path, tiny_data):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    broken = sorted((data / 'train').glob('*/*.JPEG'))[5]
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated download
    result = run_main('train.py', '--config', TINY, '--data-dir', data, '--output', tmp_path / 'run',
                      '--epochs', 1, '--strict-data')
    assert_clean_failure(result, 'cannot read image', broken.name)


def test_unknown_model_suggests_close_names(tiny_data, previous_run):
    result = run_main('train.py', '--config', SMOKE, '--data-dir', tiny_data, '--model', 'resnet5O',
                      '--output', previous_run)
    assert_clean_failure(result, "unknown model 'resnet5O'", 'resnet50')
    assert unchanged(previous_run)


def test_missing_resume_path(tiny_data, tmp_path, previous_run):
    result = run_main('train.py', '--config', SMOKE, '--data-dir', tiny_data, '--output', previous_run,
                      '--resume', tmp_path / 'gone' / 'last.pth')
    assert_clean_failure(result, 'checkpoint not found', 'gone')
    assert unchanged(previous_run) and not (tmp_path / 'gone').exists()


def test_global_batch_not_divisible_by_world_size(tiny_data, previous_run):
    result = run_main('train.py', '--config', SMOKE, '--data-dir', tiny_data, '--output', previous_run,
                      '--global-batch-size', 33, env={'WORLD_SIZE': '2'})
    assert_clean_failure(result, '--global-batch-size 33', 'world size 2')
    assert unchanged(previous_run)


def test_existing_run_is_not_overwritten(smoke_run, tiny_data):
    before = {p.name: p.stat().st_mtime_ns for p in smoke_run.iterdir()}
    result = run_main('train.py', '--config', TINY, '--data-dir', tiny_data, '--output', smoke_run)
    assert_clean_failure(result, 'already holds a run', '--resume auto')
    assert {p.name: p.stat().st_mtime_ns for p in smoke_run.iterdir()} == before


def test_debug_shows_the_traceback(tmp_path):
    result = run_script('train.py', '--config', SMOKE, '--data-dir', tmp_path / 'nowhere', '--debug')
    assert result.returncode != 0 and 'Traceback' in result.stderr


# ---- what the ecosystem reads: timm's loaders, its train.py checkpoints, TensorBoard's HParams, train.log

def test_best_checkpoint_loads_weights_only_and_into_timm(smoke_run):
    state = torch.load(smoke_run / 'best.pth', map_location='cpu', weights_only=True)
    model = timm.create_model('test_resnet', num_classes=10, checkpoint_path=str(smoke_run / 'best.pth'))
    loaded = model.state_dict()
    assert loaded.keys() == state['state_dict'].keys()
    assert all(torch.equal(loaded[k], state['state_dict'][k]) for k in loaded)
    assert state['arch'] == 'test_resnet'


def timm_checkpoint(smoke_run, out_dir):
    """best.pth's weights saved by timm's own CheckpointSaver, as timm's train.py saves them (model_best.pth.tar,
    with its arguments pickled as an argparse.Namespace)."""
    model = timm.create_model('test_resnet', num_classes=10)
    model.load_state_dict(torch.load(smoke_run / 'best.pth', weights_only=True)['state_dict'])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(model='test_resnet', lr=0.1, epochs=5),
                            checkpoint_dir=str(out_dir), recovery_dir=str(out_dir))
    saver.save_checkpoint(epoch=3, metric=50.0)
    return out_dir / 'model_best.pth.tar'


def test_validate_reads_a_timm_train_checkpoint_with_the_same_top1(smoke_run, tiny_data, tmp_path):
    ours = json.loads(run_main('validate.py', '--checkpoint', smoke_run / 'best.pth', '--data-dir', tiny_data,
                               '--json', check=True).stdout)
    path = timm_checkpoint(smoke_run, tmp_path)
    same_transform = ['--img-size', 32, '--crop-pct', 0.875, '--interpolation', 'bilinear']
    theirs = json.loads(run_main('validate.py', '--checkpoint', path, '--data-dir', tiny_data, '--json',
                                 *same_transform, check=True).stdout)
    assert theirs['top1'] == ours['top1'] and theirs['loss'] == pytest.approx(ours['loss'], rel=1e-6)
    assert (theirs['model'], theirs['epoch'], theirs['step']) == ('test_resnet', 3, None)
    default = json.loads(run_main('validate.py', '--checkpoint', path, '--data-dir', tiny_data, '--json',
                                  check=True).stdout)
    config = timm.data.resolve_data_config(model=timm.create_model('test_resnet'))  # the model's own data config
    assert (default['img_size'], default['crop_pct'], default['interpolation']) == (
        config['input_size'][-1], config['crop_pct'], config['interpolation'])


def test_validate_needs_a_model_name_for_a_bare_state_dict(smoke_run, tiny_data, tmp_path):
    bare = tmp_path / 'weights.pth'
    torch.save(torch.load(smoke_run / 'best.pth', weights_only=True)['state_dict'], bare)
    result = run_main('validate.py', '--checkpoint', bare, '--data-dir', tiny_data)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f'error: {bare} does not name its model; pass --model NAME')
    ok = run_main('validate.py', '--checkpoint', bare, '--model', 'test_resnet', '--data-dir', tiny_data, '--json',
                  '--img-size', 32, check=True)
    assert json.loads(ok.stdout)['images'] == 80


def test_pretrained_weights_without_a_network_are_one_line(tiny_data):
    result = run_script('validate.py', '--model', 'resnet18', '--pretrained', '--data-dir', tiny_data,
                        env={'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tiny_data.parent / 'hf-empty')})
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error: cannot load the pretrained weights of resnet18: ')


NUMBER = r'[\d.]+(?:e[+-]\d+)?'
INTERVAL_LINE = (rf'INFO epoch \d+/5 step (\d+)/10: loss {NUMBER} lr {NUMBER} grad_norm {NUMBER} \| \d+ img/s, data '
                 r'\d+% \| eta \d+:\d\d:\d\d \(run \d+:\d\d:\d\d\)$')


def test_train_log_holds_the_interval_lines(smoke_run):
    lines = (smoke_run / 'train.log').read_text().splitlines()
    steps = [int(m.group(1)) for line in lines if (m := re.search(INTERVAL_LINE, line))]
    assert steps == [5, 10] * 6  # --log-interval 5 of the smoke recipe, 10 steps per epoch, 6 epochs
    assert any('epoch 5/5: train loss' in line for line in lines)


def test_epoch_numbers_agree_in_log_bar_summary_checkpoints_validate_and_figures(tiny_data, tmp_path):
    """Epochs count from 0 everywhere, as timm's summary.csv counts them."""
    run_dir = tmp_path / 'run'
    result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, '--checkpoint-interval', 1,
                      terminal=True, check=True)
    rows = read_summary(run_dir)
    epochs = [int(row['epoch']) for row in rows]
    assert epochs == [0, 1]
    log = (run_dir / 'train.log').read_text()
    assert [int(e) for e in re.findall(r'INFO epoch (\d+)/1: train loss', log)] == epochs
    assert sorted({int(e) for e in re.findall(r'INFO epoch (\d+)/1 step \d+/10:', log)}) == epochs
    bars = re.findall(r'epoch (\d+)/1: +\d+%\|', result.stderr)  # tqdm's bar on the terminal
    assert sorted({int(e) for e in bars}) == epochs
    best_row = max(rows, key=lambda row: float(row['eval_top1']))  # the first best: best.pth moves on improvement
    best = torch.load(run_dir / 'best.pth', weights_only=True)
    assert best['epoch'] == best['best']['epoch'] == int(best_row['epoch'])
    assert f'best eval top-1 {float(best_row["eval_top1"]):.2f} at epoch {best_row["epoch"]}' in result.stderr
    for epoch in epochs:
        state = torch.load(run_dir / f'epoch_{epoch}.pth', weights_only=True)
        assert state['epoch'] == epoch and state['step'] == state['epoch_steps'] == 10
    assert torch.load(run_dir / 'last.pth', weights_only=True)['epoch'] == epochs[-1]
    validated = json.loads(run_main('validate.py', '--checkpoint', run_dir / 'best.pth', '--data-dir', tiny_data,
                                    '--json', check=True).stdout)
    assert (validated['epoch'], validated['step']) == (best['epoch'], None)
    figure = accuracy_curves_figure({'run': [rows]}, 'epochs')
    assert [list(line.get_xdata()) for line in figure.axes[0].lines] == [epochs]


def test_tensorboard_holds_the_hyperparameters_and_final_metrics(smoke_run):
    from tensorboard.plugins.hparams import plugin_data_pb2
    events = EventAccumulator(str(smoke_run / 'tb'))
    events.Reload()
    content = events.PluginTagToContent('hparams')
    session = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/session_start_info'])
    hparams = session.session_start_info.hparams
    assert hparams['pgt_alpha'].number_value == 0.3 and hparams['model'].string_value == 'test_resnet'
    assert hparams['lr'].number_value == 0.1
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/experiment'])
    assert {m.name.tag for m in experiment.experiment.metric_infos} == {
        'hparams/eval_top1_final', 'hparams/eval_top1_best', 'hparams/train_top1_final'}
    best = events.Scalars('hparams/eval_top1_best')[-1].value
    assert best == pytest.approx(max(float(r['eval_top1']) for r in read_summary(smoke_run)), abs=1e-4)


def test_a_run_refused_by_its_checks_creates_no_directory(tiny_data, tmp_path, monkeypatch):
    """The default --output is runs/<model>-<time>/ under the working directory: nothing may appear there."""
    monkeypatch.chdir(tmp_path)
    for bad in (['--model-kwargs', 'no_such_argument=1'], ['--diagnostics', '--diagnostics-layers', 99]):
        result = run_main('train.py', '--config', SMOKE, '--data-dir', tiny_data, *bad)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith(('error: --model-kwargs', 'error: --diagnostics'))
        assert not (tmp_path / 'runs').exists()


def test_val_img_size_changes_only_evaluation(smoke_run, tiny_data):
    from pgt.config import finalize_args, parse_config
    from pgt.loaders import build_loaders
    args = finalize_args(parse_config(['--config', str(TINY), '--data-dir', str(tiny_data), '--val-img-size', '48',
                                       '--workers', '0']), world_size=1)
    loaders = build_loaders(args, 0, 1, torch.device('cpu'))
    loaders.train.sampler.set_epoch(0)
    assert next(iter(loaders.train))[0].shape[-2:] == (32, 32) and next(iter(loaders.val))[0].shape[-2:] == (48, 48)
    result = json.loads(run_main('validate.py', '--checkpoint', smoke_run / 'best.pth', '--data-dir', tiny_data,
                                 '--val-img-size', 48, '--json', check=True).stdout)
    assert result['img_size'] == 48 and result['images'] == 80
