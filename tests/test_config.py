"""Recipes: defaults < YAML (with base chains) < command line, and the errors for bad keys and values."""
import contextlib
import io

import pytest
import yaml

from conftest import ROOT
from pgt import train
from pgt.config import build_parser, finalize_args, ignored_options_warning, parse_config, resolved_config
from pgt.errors import UsageError, run_cli


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_defaults_then_yaml_then_command_line(tmp_path):
    recipe = write(tmp_path / 'r.yaml', {'lr': 0.4, 'batch-size': 64, 'pgt_alpha': 0.3})
    args = parse_config(['--config', str(recipe), '--batch-size', '32'])
    assert (args.lr, args.batch_size, args.pgt_alpha) == (0.4, 32, 0.3)  # YAML over default, CLI over YAML
    assert build_parser().get_default('lr') is None and parse_config([]).lr is None
    assert parse_config(['--config', str(recipe), '--modify-softmax', '0.9']).pgt_alpha == 0.9  # published alias


def test_base_chain_child_overrides_parent_and_keeps_paper_block(tmp_path):
    write(tmp_path / 'base.yaml', {'lr': 0.4, 'epochs': 90, 'sched': 'cosine'})
    write(tmp_path / 'mid.yaml', {'base': 'base.yaml', 'epochs': 50})
    row = write(tmp_path / 'row.yaml', {'base': 'mid.yaml', 'model': 'resnet18', 'paper': {'table': 1}})
    args = parse_config(['--config', str(row)])
    assert (args.lr, args.epochs, args.model, args.paper) == (0.4, 50, 'resnet18', {'table': 1})


def test_unknown_key_names_key_file_and_closest_option(tmp_path):
    recipe = write(tmp_path / 'typo.yaml', {'learning-rate': 0.1, 'warmup_epoch': 5})
    with pytest.raises(UsageError) as error:
        parse_config(['--config', str(recipe)])
    message = str(error.value)
    assert 'typo.yaml' in message and "'learning_rate'" in message


def test_unknown_key_suggests_close_name(tmp_path):
    recipe = write(tmp_path / 'typo.yaml', {'warmup_epoch': 5})
    with pytest.raises(UsageError, match=r"typo.yaml: unknown key 'warmup_epoch'; did you mean 'warmup-epochs'"):
        parse_config(['--config', str(recipe)])


@pytest.mark.parametrize('key,value,expected', [
    ('lr', 'fast', 'a number'), ('epochs', 2.5, 'an integer'), ('amp', 'yes', 'true or false'),
    ('scale', [0.08], 'a list of 2'), ('sched', 'linear', 'one of cosine'), ('batch-size', True, 'an integer'),
])
def test_wrong_type_names_key_file_and_value(tmp_path, key, value, expected):
    recipe = write(tmp_path / 'bad.yaml', {key: value})
    with pytest.raises(UsageError) as error:
        parse_config(['--config', str(recipe)])
    message = str(error.value)
    assert 'bad.yaml' in message and repr(key.replace('-', '_')) in message and expected in message


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(UsageError, match='config file not found'):
        parse_config(['--config', str(tmp_path / 'nope.yaml')])
    (tmp_path / 'broken.yaml').write_text('lr: [0.1\n')
    with pytest.raises(UsageError, match='broken.yaml: not valid YAML'):
        parse_config(['--config', str(tmp_path / 'broken.yaml')])


def refusal(path, content) -> str:
    """The one line train.py prints for the recipe ``content`` (bytes or text) at ``path``, asserting exit code 2."""
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(io.StringIO()) as stderr:
        run_cli(train.main, ['--config', str(path), '--dry-run'])
    assert exit_.value.code == 2
    [line] = stderr.getvalue().splitlines()
    return line


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    assert refusal(tmp_path / 'r.yaml', 'lr: 0.1\nepochs: 3\nlr: 0.2\n') == (
        f"error: {tmp_path}/r.yaml:3: key 'lr' is given twice (first on line 1); keep one")
    assert refusal(tmp_path / 'r.yaml', 'batch-size: 32\nbatch_size: 64\n') == (
        f"error: {tmp_path}/r.yaml:2: key 'batch_size' is given twice (first on line 1); keep one")
    assert refusal(tmp_path / 'r.yaml', 'paper:\n  note: a\n  note: b\n') == (
        f"error: {tmp_path}/r.yaml:3: key 'note' is given twice (first on line 2); keep one")


def test_a_recipe_that_is_not_utf8_is_one_line_naming_the_line(tmp_path):
    assert refusal(tmp_path / 'r.yaml', b'lr: 0.1\npaper:\n  note: caf\xe9 (latin-1)\n') == (
        f'error: {tmp_path}/r.yaml:3: not UTF-8 text (byte 0xe9); save the recipe as UTF-8')


def test_aliases_that_expand_beyond_the_bound_are_refused(tmp_path):
    """A "billion laughs" recipe: nine levels of nine aliases stand for 9^9 strings in a file of 1 KB."""
    lines = ['paper:', '  a: &a [x, x, x, x, x, x, x, x, x]']
    for level in range(1, 9):
        previous, name = chr(ord('a') + level - 1), chr(ord('a') + level)
        lines.append(f'  {name}: &{name} [{", ".join([f"*{previous}"] * 9)}]')
    assert refusal(tmp_path / 'r.yaml', '\n'.join(lines) + '\n') == (
        f'error: {tmp_path}/r.yaml: its aliases expand to more than 100,000 values; a recipe needs none of that size')
    lines = ['paper:', '  a: &a [x, x]', '  b: [*a, *a]']  # aliases within the bound are read as YAML reads them
    write(tmp_path / 'ok.yaml', {})
    (tmp_path / 'ok.yaml').write_text('\n'.join(lines) + '\n')
    assert parse_config(['--config', str(tmp_path / 'ok.yaml')]).paper == {'a': ['x', 'x'], 'b': [['x', 'x']] * 2}


def test_a_recipe_and_its_paper_block_are_bounded_and_the_paper_block_is_kept_out_of_checkpoints(tmp_path):
    assert refusal(tmp_path / 'r.yaml', 'paper:\n  note: "' + 'x' * 70_000 + '"\n') == (
        f"error: {tmp_path}/r.yaml: the paper: block is over 64 KiB; it records a row's provenance, not documents")
    assert refusal(tmp_path / 'r.yaml', '# ' + 'x' * (1 << 20) + '\nlr: 0.1\n') == (
        f'error: {tmp_path}/r.yaml: 1,048,587 bytes; a recipe is at most 1,048,576')
    args = parse_config(['--config', str(ROOT / 'configs' / 'paper' / 'resnet18-cosine-pgt.yaml')])
    assert 'paper' in resolved_config(args) and 'paper' not in resolved_config(args, provenance=False)


def test_unknown_command_line_option_is_a_usage_error():
    with pytest.raises(UsageError, match='unrecognized arguments: --lrr'):
        parse_config(['--lrr', '0.1'])


def test_global_batch_splits_over_world_and_accumulation():
    args = finalize_args(parse_config(['--global-batch-size', '1024', '--grad-accum-steps', '2']), world_size=4)
    assert args.batch_size == 128
    with pytest.raises(UsageError, match='not divisible by world size 3'):
        finalize_args(parse_config(['--global-batch-size', '1024']), world_size=3)


def test_resolved_config_round_trips(tmp_path):
    args = parse_config(['--lr', '0.3', '--model', 'resnet18', '--pgt-alpha', '0.25'])
    saved = write(tmp_path / 'config.yaml', resolved_config(args))
    reread = {k: v for k, v in vars(parse_config(['--config', str(saved)])).items() if k != '_origins'}
    assert reread == {**{k: v for k, v in vars(args).items() if k != '_origins'}, 'config': str(saved)}


@pytest.mark.parametrize('value', ['1.5', '-0.1', 'nan'])
def test_alpha_outside_unit_interval_is_rejected_before_the_run(value):
    with pytest.raises(UsageError, match=r'--pgt-alpha: must be (in \[0, 1\]|a finite number)'):
        finalize_args(parse_config(['--pgt-alpha', value]), world_size=1)


# ---- timm's command-line conventions and its args.yaml

def test_timm_short_options():
    args = parse_config(['-c', str(ROOT / 'configs' / 'smoke.yaml'), '-b', '16', '-j', '3'])
    assert (args.config, args.batch_size, args.workers) == (str(ROOT / 'configs' / 'smoke.yaml'), 16, 3)
    assert args.pgt_alpha == 0.3  # the recipe named with -c was read


@pytest.mark.parametrize('abbreviation', [['--smooth', '0.1'], ['--warmup-epoch', '3'], ['--lr-base-s', '512']])
def test_abbreviated_options_are_errors_not_other_options(abbreviation):
    with pytest.raises(UsageError, match=f'unrecognized arguments: {abbreviation[0]}'):
        parse_config(abbreviation)


def test_floats_in_recipes_are_read_as_yaml_1_2_reads_them(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('lr: 1e-3\nwarmup-lr: 5E-5\nweight-decay: 2.0e-5\nmin-lr: .5e-6\nepochs: 10\n')
    args = parse_config(['--config', str(recipe)])
    assert (args.lr, args.warmup_lr, args.weight_decay, args.min_lr) == (0.001, 5e-5, 2e-5, 5e-7)
    assert args.epochs == 10 and isinstance(args.epochs, int)


def test_null_and_empty_values_keep_the_default(tmp_path):
    recipe = write(tmp_path / 'r.yaml', {'img-size': None, 'resume': '', 'interpolation': '', 'smoothing': None})
    args = parse_config(['--config', str(recipe)])
    assert (args.img_size, args.resume, args.interpolation, args.smoothing) == (None, None, None, 0.1)


TIMM_ARGS = ROOT / 'tests' / 'data' / 'timm-args.yaml'  # written by timm's own train.py: all 172 options


def timm_args_yaml(path, **changes):
    """timm's own args.yaml with a few values changed, as a user's run of timm's train.py writes it."""
    args = yaml.safe_load(TIMM_ARGS.read_text())
    assert len(args) == 172
    path.write_text(yaml.safe_dump({**args, **changes}))
    return path


def test_timm_train_pys_own_args_yaml_is_a_recipe(capsys):
    """Every key that timm's train.py writes is an option of this suite or one it knows it ignores; at timm's
    defaults nothing is refused and nothing needs a warning."""
    args = finalize_args(parse_config(['--config', str(TIMM_ARGS)]), world_size=1)
    assert (args.model, args.epochs, args.batch_size, args.data_dir) == ('resnet50', 300, 128, '/data/imagenet')
    assert ignored_options_warning(args) is None
    assert run_cli_code(['--config', str(TIMM_ARGS), '--dry-run']) == 0


def run_cli_code(argv) -> int:
    from pgt import train
    from pgt.errors import run_cli
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, argv)
    return exit_.value.code


def test_a_timm_args_yaml_is_read_with_one_warning_naming_what_is_ignored(tmp_path):
    path = timm_args_yaml(tmp_path / 'args.yaml', model='resnet18', batch_size=64, data_dir='/imagenet',
                          checkpoint_hist=3, log_wandb=True)
    args = finalize_args(parse_config(['--config', str(path)]), world_size=1)
    assert (args.model, args.batch_size, args.dataset) == ('resnet18', 64, 'imagefolder')
    assert args.lr == pytest.approx(0.1 * 64 / 256)  # timm's rule for lr: null
    assert args.data_dir == '/imagenet' and args.resume is None and args.output is None
    assert ignored_options_warning(args) == (f'{path}: 2 timm option(s) that this suite does not implement are '
                                             f'ignored: checkpoint_hist: 3; log_wandb: True')


def test_timm_options_that_change_the_training_are_refused_unless_allowed(tmp_path, capsys):
    path = timm_args_yaml(tmp_path / 'args.yaml', model_ema=True, reprob=0.25, checkpoint_hist=3)
    with pytest.raises(UsageError) as refused:
        parse_config(['--config', str(path)])
    assert str(refused.value) == (f"{path}: timm option(s) that this suite does not implement and that change the "
                                  f"training: model_ema: True; reprob: 0.25; train without them with "
                                  f"--allow-timm-ignored, or remove them")
    assert run_cli_code(['--config', str(path), '--dry-run']) == 2
    assert capsys.readouterr().err.strip() == f'error: {refused.value}'
    args = parse_config(['--config', str(path), '--allow-timm-ignored'])
    assert ignored_options_warning(args) == (f'{path}: 3 timm option(s) that this suite does not implement are '
                                             f'ignored: model_ema: True; reprob: 0.25; checkpoint_hist: 3')


def test_a_misspelt_key_is_still_an_error_next_to_timm_keys(tmp_path):
    path = timm_args_yaml(tmp_path / 'args.yaml', learning_rate=0.1)
    with pytest.raises(UsageError, match="unknown key 'learning_rate'"):
        parse_config(['--config', str(path)])


def test_timm_learning_rate_rule_without_lr():
    args = finalize_args(parse_config(['--batch-size', '64', '--grad-accum-steps', '2']), world_size=4)
    assert args.lr == pytest.approx(0.1 * 64 * 4 * 2 / 256)
    adam = finalize_args(parse_config(['--batch-size', '64', '--opt', 'adamw']), world_size=4)
    assert adam.lr == pytest.approx(0.1 * (64 * 4 / 256) ** 0.5)  # square-root scaling for adaptive optimizers


def test_model_kwargs_from_the_command_line_and_a_recipe(tmp_path):
    args = parse_config(['--model-kwargs', 'zero_init_last=False', 'drop_rate=0.1'])
    assert args.model_kwargs == {'zero_init_last': False, 'drop_rate': 0.1}
    recipe = write(tmp_path / 'r.yaml', {'model-kwargs': {'zero_init_last': False}})
    assert parse_config(['--config', str(recipe)]).model_kwargs == {'zero_init_last': False}
    with pytest.raises(UsageError, match="key 'model_kwargs': expected a mapping"):
        parse_config(['--config', str(write(tmp_path / 'bad.yaml', {'model-kwargs': ['zero_init_last']}))])


def test_data_settings_default_to_the_models_own(tmp_path):
    """As timm's train.py: what is not given comes from the model's default pretrained configuration."""
    args = finalize_args(parse_config(['--model', 'resnet18_nobn']), world_size=1)
    assert (args.img_size, args.val_img_size, args.crop_pct, args.interpolation) == (224, 224, 0.875, 'bilinear')
    given = finalize_args(parse_config(['--model', 'resnet18_nobn', '--img-size', '160', '--val-img-size', '224']),
                          world_size=1)
    assert (given.img_size, given.val_img_size) == (160, 224)
