"""Recipes: defaults < YAML (with base chains) < command line, and the errors for bad keys and values."""
import pytest
import yaml

from pgt.config import build_parser, finalize_args, parse_config, resolved_config
from pgt.errors import UsageError


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_defaults_then_yaml_then_command_line(tmp_path):
    default_lr = build_parser().get_default('lr')
    recipe = write(tmp_path / 'r.yaml', {'lr': 0.4, 'batch-size': 64, 'pgt_alpha': 0.3})
    args = parse_config(['--config', str(recipe), '--batch-size', '32'])
    assert (args.lr, args.batch_size, args.pgt_alpha) == (0.4, 32, 0.3)  # YAML over default, CLI over YAML
    assert parse_config([]).lr == default_lr == 0.1
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
