"""Options of train.py: timm's names, YAML recipes composed with ``base:``, and defaults < YAML < command line.

A recipe is a YAML mapping whose keys are option names (dashes or underscores). Two keys are not options:
``base`` names a parent recipe (relative to the file) merged underneath, and ``paper`` holds the provenance of a
paper row (table, row, train_acc, test_acc, note), which scripts/report.py reads. Everything is checked before a run
starts: an unknown key or a value of the wrong type names the key, the file and the closest known option.
"""
from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import UsageError

META_KEYS = ('base', 'paper')
# Run control, not part of a recipe: left out of the resolved config.yaml so that it can be passed back as --config.
RUN_CONTROL_KEYS = ('config', 'resume', 'overwrite', 'dry_run', 'debug', 'output', 'data_dir',
                    'stop_after_epoch')


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 through run_cli instead of argparse's usage dump
        raise UsageError(f'{message} (see --help)')


def _bool_flag(group, name, help):
    group.add_argument(name, action=argparse.BooleanOptionalAction, default=False, help=help)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description='Train an ImageNet classifier with timm, optionally with the PowerGrad Transform.')
    g = p.add_argument_group('run')
    g.add_argument('--config', metavar='FILE.yaml', help='recipe; the command line overrides its values')
    g.add_argument('--output', metavar='DIR', help='run directory (default: runs/<model>-<time>)')
    g.add_argument('--resume', metavar='PATH|auto', help="checkpoint to continue from; 'auto' picks the newest valid "
                                                         'checkpoint in --output')
    _bool_flag(g, '--overwrite', 'allow writing into a run directory that already holds a run')
    _bool_flag(g, '--dry-run', 'resolve and print the configuration, then exit')
    _bool_flag(g, '--debug', 'show tracebacks for errors')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--log-interval', type=int, default=50, metavar='STEPS')
    g.add_argument('--checkpoint-interval', type=int, default=0, metavar='EPOCHS',
                   help='also keep epoch_<N>.pth every N epochs (0: only last and best)')
    g.add_argument('--recovery-interval', type=int, default=0, metavar='STEPS',
                   help='write recovery.pth every N training steps within an epoch (0: off)')
    g.add_argument('--stop-after-epoch', type=int, default=None, metavar='E',
                   help='end this job cleanly after epoch E (0-based), to split a run over job time slots')
    g.add_argument('--max-skipped-steps', type=int, default=10, metavar='K',
                   help='stop after K consecutive steps with a non-finite loss or gradient')

    g = p.add_argument_group('data')
    g.add_argument('--data-dir', metavar='DIR', help='ImageNet layout: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG')
    g.add_argument('--data-backend', default='torch', choices=('torch', 'dali', 'synthetic'))
    g.add_argument('--dali', dest='data_backend', action='store_const', const='dali',
                   help='alias of --data-backend dali (the published code\'s flag)')
    g.add_argument('--dali-device', choices=('gpu', 'cpu'), default=None,
                   help='DALI decoding device (default: gpu when CUDA is available)')
    g.add_argument('--workers', type=int, default=4)
    g.add_argument('--num-classes', type=int, default=None, help='default: the number of class folders')
    g.add_argument('--img-size', type=int, default=224)
    g.add_argument('--crop-pct', type=float, default=0.875,
                   help='evaluation: resize to img_size / crop_pct, then centre crop')
    g.add_argument('--interpolation', default='bilinear', help='evaluation resize interpolation')
    g.add_argument('--train-interpolation', default='random', help="training crop interpolation (timm: 'random')")
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], metavar=('MIN', 'MAX'))
    g.add_argument('--ratio', type=float, nargs=2, default=[3 / 4, 4 / 3], metavar=('MIN', 'MAX'))
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--color-jitter', type=float, default=0.4, help='timm default 0.4; the papers used none (0)')
    _bool_flag(g, '--strict-data', 'stop at an unreadable training image instead of replacing it')
    g.add_argument('--synthetic-steps', type=int, default=100, metavar='N',
                   help='batches per epoch of the synthetic backend')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='resnet50')
    _bool_flag(g, '--channels-last', 'NHWC memory layout')
    _bool_flag(g, '--sync-bn', 'synchronise batch-norm statistics across ranks')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                   help='torch.compile the model (default backend inductor)')

    g = p.add_argument_group('optimisation')
    g.add_argument('--opt', default='sgd', help="timm optimizer name; 'sgd' is Nesterov SGD")
    g.add_argument('--lr', type=float, default=0.1)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--batch-size', type=int, default=128, help='per-GPU batch')
    g.add_argument('--global-batch-size', type=int, default=None,
                   help='total batch over all ranks; sets the per-GPU batch to G / world size / grad-accum-steps')
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--clip-grad', type=float, default=None, help='threshold (norm, value) or clip factor (agc)')
    g.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'))
    _bool_flag(g, '--amp', 'mixed precision')
    g.add_argument('--amp-dtype', default='auto', choices=('auto', 'float16', 'bfloat16'),
                   help='auto: bfloat16 where the device supports it, else float16')

    g = p.add_argument_group('schedule')
    g.add_argument('--sched', default='cosine', choices=('cosine', 'step', 'multistep', 'constant', 'none'))
    g.add_argument('--epochs', type=int, default=300)
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--decay-epochs', type=float, default=90.0)
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270])
    g.add_argument('--decay-rate', type=float, default=0.1)
    _bool_flag(g, '--sched-on-updates', 'step the schedule every update instead of every epoch')

    g = p.add_argument_group('loss')
    g.add_argument('--smoothing', type=float, default=0.1)
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--pgt-alpha', '--modify-softmax', type=float, default=None, metavar='ALPHA',
                   help='turn on the PowerGrad Transform with this alpha in [0, 1]')
    g.add_argument('--pgt-start-epoch', type=int, default=0, help='plain cross-entropy before this epoch')

    g = p.add_argument_group('diagnostics')
    _bool_flag(g, '--diagnostics', 'log logit, filter and gradient-conditioning metrics')
    g.add_argument('--diagnostics-interval', type=int, default=200, metavar='STEPS')
    g.add_argument('--diagnostics-mask', type=float, default=0.0, metavar='FRACTION',
                   help='random masking of gradient vectors per layer (thesis Sec. 1.6), e.g. 0.05; 0: off')
    return p


def _actions_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every spelling a recipe may use for an option: its long names, with dashes or underscores."""
    keys = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith('--'):
                keys[option[2:].replace('-', '_')] = action
    keys.pop('help', None)
    return keys


def _check_value(action: argparse.Action, value: Any, where: str) -> Any:
    def wrong(expected):
        return UsageError(f'{where}: expected {expected}, got {value!r}')

    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise wrong('true or false')
        return value
    if isinstance(action, argparse._StoreConstAction):
        if not isinstance(value, bool):
            raise wrong('true or false')
        return action.const if value else action.default
    if value is None:
        return None
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        if not isinstance(value, list) or (isinstance(action.nargs, int) and len(value) != action.nargs):
            raise wrong(f'a list of {action.nargs if isinstance(action.nargs, int) else "one or more"} values')
        return [_check_scalar(action, v, wrong) for v in value]
    if action.nargs == '?' and isinstance(value, bool):
        return action.const if value else None
    return _check_scalar(action, value, wrong)


def _check_scalar(action, value, wrong):
    kind = action.type or str
    if isinstance(value, bool) or (kind is float and not isinstance(value, (int, float))) \
            or (kind is int and not isinstance(value, int)) or (kind is str and not isinstance(value, str)):
        raise wrong({float: 'a number', int: 'an integer', str: 'a string'}[kind])
    value = kind(value)
    if action.choices is not None and value not in action.choices:
        raise wrong(f'one of {", ".join(map(str, action.choices))}')
    return value


def load_recipe(path: str | os.PathLike, _seen: tuple = ()) -> tuple[dict, dict]:
    """Read a recipe and its ``base:`` chain. Returns (merged mapping, key -> file it came from)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f'config file not found: {path}')
    if path.resolve() in _seen:
        raise UsageError(f'{path}: base recipes form a cycle: {" -> ".join(map(str, _seen + (path,)))}')
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UsageError(f'{path}: not valid YAML: {" ".join(str(error).split())}') from None
    if not isinstance(data, dict):
        raise UsageError(f'{path}: a recipe must be a mapping of option names to values')
    data = {str(k).replace('-', '_'): v for k, v in data.items()}
    merged, sources = {}, {}
    if data.get('base'):
        merged, sources = load_recipe(path.parent / str(data['base']), _seen + (path.resolve(),))
    merged.update({k: v for k, v in data.items() if k != 'base'})
    sources.update({k: str(path) for k in data if k != 'base'})
    return merged, sources


def recipe_to_defaults(recipe: dict, sources: dict, parser: argparse.ArgumentParser) -> dict:
    """Check every recipe key and value against the parser; return argparse defaults keyed by ``dest``."""
    actions = _actions_by_key(parser)
    defaults = {}
    for key, value in recipe.items():
        if key in META_KEYS:
            continue
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f'; did you mean {close[0].replace("_", "-")!r}?' if close else ''
            raise UsageError(f'{sources[key]}: unknown key {key!r}{hint}')
        action = actions[key]
        defaults[action.dest] = _check_value(action, value, f'{sources[key]}: key {key!r}')
    return defaults


def parse_config(argv: Sequence[str]) -> argparse.Namespace:
    """defaults < YAML recipe (with its bases) < command line. ``args.paper`` holds the recipe's paper block."""
    parser = build_parser()
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument('--config')
    known, _ = config_only.parse_known_args(argv)
    recipe = {}
    if known.config:
        recipe, sources = load_recipe(known.config)
        parser.set_defaults(**recipe_to_defaults(recipe, sources, parser))
    args = parser.parse_args(argv)
    args.paper = recipe.get('paper')
    return args


def resolved_config(args: argparse.Namespace) -> dict:
    """The configuration a run used, as a recipe that ``--config`` accepts again."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUN_CONTROL_KEYS and v is not None}


def save_config(args: argparse.Namespace, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(resolved_config(args), sort_keys=False))


def finalize_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Checks that need the whole configuration (and the world size), and the per-GPU batch from the global one."""
    if args.global_batch_size is not None:
        per_update = world_size * args.grad_accum_steps
        if args.global_batch_size % per_update:
            raise UsageError(f'--global-batch-size {args.global_batch_size} is not divisible by world size '
                             f'{world_size} x grad-accum-steps {args.grad_accum_steps}')
        args.batch_size = args.global_batch_size // per_update
    if args.amp_dtype == 'auto':
        import torch
        cuda_without_bf16 = torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
        args.amp_dtype = 'float16' if cuda_without_bf16 else 'bfloat16'
    if args.pgt_alpha is not None and not 0.0 <= args.pgt_alpha <= 1.0:
        raise UsageError(f'--pgt-alpha must be in [0, 1], got {args.pgt_alpha}')
    for name in ('batch_size', 'grad_accum_steps', 'epochs', 'log_interval', 'max_skipped_steps'):
        if getattr(args, name) < 1:
            raise UsageError(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    if (args.mixup or args.cutmix) and args.batch_size % 2:
        raise UsageError(f'mixup/cutmix need an even per-GPU batch, got {args.batch_size}')
    if args.clip_mode == 'agc' and args.clip_grad is None:
        raise UsageError('--clip-mode agc needs --clip-grad (the clip factor, e.g. 0.01)')
    return args
