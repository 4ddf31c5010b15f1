"""Options of train.py: timm's names, YAML recipes composed with ``base:``, and defaults < YAML < command line.

A recipe is a YAML mapping whose keys are option names (dashes or underscores). Three keys are not options: ``base``
names a parent recipe (relative to the file) merged underneath, ``paper`` holds the provenance of a paper row (table,
row, train_acc, test_acc, baseline, note), which the report reads, and ``grid`` lists the values a grid-search recipe
sweeps (pgt.paper). A ``null`` value means the option's default. Everything is checked before a run starts: an
unknown key or a value of the wrong type names the key, the file and the closest known option. A timm train.py
``args.yaml`` is accepted too (pgt.timm_args): its options that this suite does not implement are ignored, named in
one warning when not at timm's default, and refused when they would change the training (--allow-timm-ignored).

Recipe files are read by pgt.recipes (YAML 1.2 numbers; duplicate keys, other encodings and oversized files refused).
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
from typing import Any, Sequence

import yaml
from timm.utils import ParseKwargs

from .errors import CliParser, UsageError
from .recipes import load_recipe
from .timm_args import TIMM_ONLY_OPTIONS, changed_options, refusal_line, warning_line

META_KEYS = ('base', 'paper', 'grid')
# Run control, not part of a recipe: left out of the resolved config.yaml so that it can be passed back as --config.
RUN_CONTROL_KEYS = ('config', 'resume', 'overwrite', 'dry_run', 'debug', 'output', 'data_dir',
                    'stop_after_epoch', 'allow_config_change', 'allow_timm_ignored', 'dataset_download')
# Options that may differ between the jobs of one run without changing what it trains. The per-GPU batch may change
# with the number of GPUs (--global-batch-size): the global batch is compared instead (pgt.config.config_changes).
OPERATIONAL_KEYS = ('workers', 'loader_timeout', 'log_interval', 'recovery_interval', 'checkpoint_interval',
                    'max_skipped_steps', 'strict_data', 'max_image_pixels', 'data_backend', 'dali_device',
                    'torchcompile', 'diagnostics', 'diagnostics_interval', 'diagnostics_mask', 'diagnostics_layers',
                    'paper', 'grid', 'batch_size', 'grad_accum_steps', 'global_batch_size', 'signal_check_interval',
                    'deterministic')


def _bool_flag(group, name, help):
    group.add_argument(name, action=argparse.BooleanOptionalAction, default=False, help=help)


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description='Train an ImageNet classifier with timm, optionally with the PowerGrad Transform.')
    g = p.add_argument_group('run')
    g.add_argument('-c', '--config', metavar='FILE.yaml', help='recipe (or a timm args.yaml); the command line '
                                                             'overrides its values')
    g.add_argument('--output', metavar='DIR', help='run directory (default: runs/<model>-<time>)')
    g.add_argument('--resume', metavar='PATH|auto', help="checkpoint to continue from; 'auto' picks the newest valid "
                                                         'checkpoint in --output')
    _bool_flag(g, '--overwrite', 'replace the run that --output holds (its checkpoints and logs are deleted)')
    _bool_flag(g, '--allow-config-change', 'resume a run under a configuration other than the one it started with')
    _bool_flag(g, '--allow-timm-ignored', "train from a timm args.yaml that sets options this suite does not "
                                          'implement (pgt/timm_args.py), without them')
    _bool_flag(g, '--dry-run', 'resolve and print the configuration, then exit')
    _bool_flag(g, '--debug', 'show tracebacks for errors')
    g.add_argument('--seed', type=int, default=42, help='rank r draws from seed + r; the data order from seed')
    g.add_argument('--log-interval', type=int, default=50, metavar='STEPS', help='a log line every N steps')
    g.add_argument('--checkpoint-interval', type=int, default=0, metavar='EPOCHS',
                   help='also keep epoch_<E>.pth, the end of epoch E, every N epochs (0: only last and best)')
    g.add_argument('--recovery-interval', type=int, default=0, metavar='STEPS',
                   help='write recovery.pth every N training steps within an epoch (0: off)')
    g.add_argument('--signal-check-interval', type=int, default=10, metavar='STEPS',
                   help='under DDP, ranks agree on a preemption signal every N steps (at most --recovery-interval)')
    g.add_argument('--stop-after-epoch', type=int, default=None, metavar='E',
                   help='end this job cleanly after epoch E (0-based), to split a run over job time slots')
    g.add_argument('--max-skipped-steps', type=int, default=10, metavar='K',
                   help='stop after K consecutive steps with a non-finite loss or gradient')

    g = p.add_argument_group('data')
    g.add_argument('--data-dir', metavar='DIR', help='ImageNet layout: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG; '
                                                     'for --dataset cifar10, the folder of cifar-10-batches-py/')
    g.add_argument('--dataset', default='imagefolder', choices=('imagefolder', 'cifar10'),
                   help='ImageNet-layout folders, or CIFAR-10 in torchvision\'s format')
    _bool_flag(g, '--dataset-download', "download the dataset into --data-dir if it is not there (cifar10; timm's "
                                        'option)')
    g.add_argument('--download', dest='dataset_download', action='store_const', const=True,
                   help='alias of --dataset-download')
    g.add_argument('--data-backend', default='torch', choices=('torch', 'dali', 'synthetic'),
                   help='decoding in DataLoader workers, in NVIDIA DALI, or one random batch (timing the step)')
    g.add_argument('--dali', dest='data_backend', action='store_const', const='dali',
                   help='alias of --data-backend dali (the published code\'s flag)')
    g.add_argument('--dali-device', choices=('gpu', 'cpu'), default=None,
                   help='DALI decoding device (default: gpu when CUDA is available)')
    g.add_argument('-j', '--workers', type=int, default=4,
                   help='data loading processes per rank (at most the CPUs the process may use)')
    g.add_argument('--loader-timeout', type=int, default=300, metavar='SECONDS',
                   help='stop with an error when the loader workers deliver no batch for this long (a worker hung)')
    g.add_argument('--num-classes', type=int, default=None, help='default: the number of class folders')
    g.add_argument('--img-size', type=int, default=None, help="training image size (default: the model's)")
    g.add_argument('--train-img-sizes', type=int, nargs='+', default=None, metavar='SIZE',
                   help="timm's scheduled resolutions: each training batch is cropped to one of these sizes (default: "
                        '--img-size for all)')
    g.add_argument('--train-size-probs', type=float, nargs='+', default=None, metavar='WEIGHT',
                   help='base weight of each --train-img-sizes choice (default: uniform)')
    g.add_argument('--train-size-schedule', default='constant', choices=('constant', 'progressive'),
                   help='constant: each batch draws its size; progressive: the draw moves from the first size to the '
                        'last over --epochs (timm)')
    g.add_argument('--train-size-schedule-spread', type=float, default=0.65,
                   help='progressive: spread of the draw around its moving centre, in choices (0: the nearest only)')
    g.add_argument('--train-size-random-mix', type=float, default=0.1,
                   help='progressive: fraction of batches whose size is drawn uniformly instead')
    g.add_argument('--val-img-size', type=int, default=None,
                   help='evaluation image size (default: --img-size); train low, test high for a cheaper run')
    g.add_argument('--crop-pct', type=float, default=None,
                   help="evaluation: resize to size / crop_pct, then centre crop (default: the model's)")
    g.add_argument('--interpolation', default=None, help="evaluation resize interpolation (default: the model's)")
    g.add_argument('--train-interpolation', default='random', help="training crop interpolation (timm: 'random')")
    g.add_argument('--mean', type=float, nargs=3, default=None, metavar=('R', 'G', 'B'),
                   help="normalisation mean (default: the model's)")
    g.add_argument('--std', type=float, nargs=3, default=None, metavar=('R', 'G', 'B'),
                   help="normalisation standard deviation (default: the model's)")
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], metavar=('MIN', 'MAX'),
                   help='random-resized-crop area fraction')
    g.add_argument('--ratio', type=float, nargs=2, default=[3 / 4, 4 / 3], metavar=('MIN', 'MAX'),
                   help='random-resized-crop aspect ratio')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4, help='timm default 0.4; the papers used none (0)')
    _bool_flag(g, '--strict-data', 'stop at an unreadable training image instead of replacing it')
    g.add_argument('--max-image-pixels', type=int, default=89_478_485, metavar='PIXELS',
                   help='an image with more pixels is unreadable (a decompression bomb); PIL itself refuses more than '
                        "twice its limit, 179 million, whatever this says")
    g.add_argument('--synthetic-steps', type=int, default=100, metavar='N',
                   help='batches per epoch of the synthetic backend')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='resnet50', help='timm model name (or resnet18_nobn, resnet20_cifar)')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                   help="arguments of the model's constructor, as timm's option (e.g. zero_init_last=False)")
    _bool_flag(g, '--channels-last', 'NHWC memory layout')
    _bool_flag(g, '--sync-bn', 'synchronise batch-norm statistics across ranks (CUDA only)')
    _bool_flag(g, '--deterministic', 'deterministic CUDA kernels (slower): a resumed run then equals the uninterrupted '
                                     'one bit for bit on a GPU too, as it always does on a CPU')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                   help='torch.compile the model (default backend inductor)')

    g = p.add_argument_group('optimisation')
    g.add_argument('--opt', default='sgd', help="timm optimizer name; 'sgd' is Nesterov SGD")
    g.add_argument('--lr', type=float, default=None,
                   help='peak learning rate (default, as timm: --lr-base scaled by global batch / --lr-base-size)')
    g.add_argument('--lr-base', type=float, default=0.1, help='learning rate at --lr-base-size, when --lr is not given')
    g.add_argument('--lr-base-size', type=int, default=256, help='global batch of --lr-base')
    g.add_argument('--lr-base-scale', default=None, choices=('linear', 'sqrt'),
                   help='default: sqrt for adaptive optimizers (ada*, lamb), linear otherwise (timm\'s rule)')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--weight-decay', type=float, default=2e-5, help='not applied to biases and normalisation')
    g.add_argument('-b', '--batch-size', type=int, default=128, help='per-GPU batch')
    g.add_argument('--global-batch-size', type=int, default=None,
                   help='total batch over all ranks; sets the per-GPU batch to G / world size / grad-accum-steps')
    g.add_argument('--grad-accum-steps', type=int, default=1, help='micro-batches per optimizer update')
    g.add_argument('--clip-grad', type=float, default=None, help='threshold (norm, value) or clip factor (agc)')
    g.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'),
                   help="as timm's train.py: agc leaves the classifier out, norm and value clip every parameter")
    _bool_flag(g, '--amp', 'mixed precision')
    g.add_argument('--amp-dtype', default='auto', choices=('auto', 'float16', 'bfloat16'),
                   help='auto: bfloat16 where the hardware has it (CUDA compute capability 8.0+, or a CPU), else '
                        'float16')

    g = p.add_argument_group('schedule')
    g.add_argument('--sched', default='cosine', choices=('cosine', 'step', 'multistep', 'constant', 'none'),
                   help="timm's schedule after the warmup")
    g.add_argument('--epochs', type=int, default=300, help='epochs of the schedule (cosine: cooldown comes after)')
    g.add_argument('--warmup-epochs', type=int, default=5, help='linear warmup from --warmup-lr')
    g.add_argument('--warmup-lr', type=float, default=1e-5, help='learning rate at the start of the warmup')
    _bool_flag(g, '--warmup-prefix', "timm's: the warmup comes before the --epochs of the schedule, which then starts "
                                     'at the peak (without it the warmup overlaps the schedule\'s start); the run is '
                                     '--warmup-epochs longer')
    g.add_argument('--min-lr', type=float, default=0.0, help='floor of the decay, and the cooldown rate')
    g.add_argument('--cooldown-epochs', type=int, default=0, help='epochs at --min-lr after a cosine')
    g.add_argument('--decay-epochs', type=float, default=90.0,
                   help='step: the rate is multiplied by --decay-rate every N epochs')
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270],
                   help='multistep: the epochs where the rate drops')
    g.add_argument('--decay-rate', type=float, default=0.1, help='factor of each step or milestone')
    _bool_flag(g, '--sched-on-updates', 'step the schedule every update instead of every epoch')
    g.add_argument('--schedule-origin', default='timm', choices=('timm', 'fork'),
                   help="timm: epoch k trains at the schedule's rate for k; fork: as the published code ran it, epoch "
                        'k >= 1 at the rate for k + 1 (it counts the epoch up before it steps the schedule)')

    g = p.add_argument_group('loss')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (0: off)')
    g.add_argument('--pgt-alpha', '--modify-softmax', type=float, default=None, metavar='ALPHA',
                   help='turn on the PowerGrad Transform with this alpha in [0, 1]')
    g.add_argument('--pgt-start-epoch', type=int, default=0, help='plain cross-entropy before this epoch')
    g.add_argument('--pgt-impl', default='exact', choices=('exact', 'hook'),
                   help="exact: Eq. 5-6 from the logits (pgt.transform); hook: the published code's backward hook, "
                        'exact only at a float16 loss scale of (per-GPU batch)^2 (pgt.published_hook)')

    g = p.add_argument_group('diagnostics')
    _bool_flag(g, '--diagnostics', 'log logit, filter and gradient-conditioning metrics')
    g.add_argument('--diagnostics-interval', type=int, default=200, metavar='STEPS', help='a probe every N steps')
    g.add_argument('--diagnostics-mask', type=float, default=0.0, metavar='FRACTION',
                   help='random masking of gradient vectors per layer (thesis Sec. 1.6), e.g. 0.05; 0: off')
    g.add_argument('--diagnostics-layers', type=int, nargs='+', default=[11, 19], metavar='K',
                   help='weight layers (0-based, in parameter order) whose per-filter norms are recorded as a series '
                        '(the papers\' Fig. 5: layers 11 and 19 of ResNet-18)')
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
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict):
            raise wrong('a mapping of argument names to values')
        return {str(k): v for k, v in value.items()}
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


def recipe_to_defaults(recipe: dict, sources: dict, parser: argparse.ArgumentParser) -> tuple[dict, dict]:
    """Check every recipe key and value against the parser. Returns (argparse defaults keyed by ``dest``, the timm
    train.py options that this suite does not implement, which are ignored). ``null`` (and timm's '' for an unset
    string) leaves the option at its default."""
    actions = _actions_by_key(parser)
    defaults, ignored = {}, {}
    for key, value in recipe.items():
        if key in META_KEYS:
            continue
        if key not in actions:
            if key in TIMM_ONLY_OPTIONS:
                ignored[key] = value
                continue
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f'; did you mean {close[0].replace("_", "-")!r}?' if close else ''
            raise UsageError(f'{sources[key]}: unknown key {key!r}{hint}')
        if value is None or value == '':
            continue
        action = actions[key]
        defaults[action.dest] = _check_value(action, value, f'{sources[key]}: key {key!r}')
    return defaults, ignored


def parse_config(argv: Sequence[str]) -> argparse.Namespace:
    """defaults < YAML recipe (with its bases) < command line. ``args.paper`` holds the recipe's paper block and
    ``args._origins`` where each value came from (for error messages)."""
    parser = build_parser()
    config_only = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_only.add_argument('-c', '--config')
    known, _ = config_only.parse_known_args(argv)
    recipe, sources, ignored = {}, {}, {}
    if known.config:
        recipe, sources = load_recipe(known.config)
        defaults, ignored = recipe_to_defaults(recipe, sources, parser)
        parser.set_defaults(**defaults)
    # argparse fills in a default only for attributes the namespace lacks: those still unset were not on the command
    # line, which tells where each value comes from.
    unset = object()
    args = parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != 'help'}))
    actions = _actions_by_key(parser)
    origins = {}
    for dest, value in vars(args).items():
        option = '--' + dest.replace('_', '-')
        if value is unset:
            setattr(args, dest, parser.get_default(dest))
            key = next((k for k in sources if k in actions and actions[k].dest == dest), None)
            origins[dest] = f'{sources[key]}: key {key!r}' if key else f'default {option}'
        else:
            origins[dest] = option
    args.paper = recipe.get('paper')
    args.grid = recipe.get('grid')
    args._origins = origins
    args._ignored_timm_options = (known.config, ignored) if ignored else None
    if changed_options(ignored)[0] and not args.allow_timm_ignored:
        raise UsageError(refusal_line(known.config, changed_options(ignored)[0]))
    return args


def ignored_options_warning(args: argparse.Namespace) -> str | None:
    """The one warning line for a recipe's timm options that this suite does not implement and that are not at
    timm's default (None if there are none)."""
    return warning_line(*args._ignored_timm_options) if args._ignored_timm_options else None


def resolved_config(args: argparse.Namespace, provenance: bool = True) -> dict:
    """The configuration a run used, as a recipe that ``--config`` accepts again (a grid recipe's ``grid:`` block
    describes the sweep, not the run, and is left out). Without ``provenance``, also without the ``paper:`` block:
    a run carries its recipe's provenance once, in config.yaml, not in every checkpoint and TensorBoard file."""
    return {k: v for k, v in sorted(vars(args).items())
            if k not in RUN_CONTROL_KEYS and k != 'grid' and not k.startswith('_') and v is not None
            and (provenance or k != 'paper')}


def config_changes(saved: dict, current: dict, saved_world_size: int, world_size: int) -> list[str]:
    """What would make a resumed run train something other than the run it continues: every option outside
    OPERATIONAL_KEYS (and --amp-dtype when neither run uses --amp), and the global batch. Returns 'name: old -> new'
    entries.

    An option the saved configuration does not have came with a later version of the suite than the run's: the run
    trained as its default does (a new option's default keeps the old behaviour), so it compares as that default,
    and updating the suite does not stop a run from resuming."""
    ignored = set(OPERATIONAL_KEYS)
    if not saved.get('amp') and not current.get('amp'):
        ignored.add('amp_dtype')  # resolved from 'auto' by the device, and unused without --amp
    parser = build_parser()
    saved = {**{key: parser.get_default(key) for key in current if key not in saved}, **saved}
    changes = [f'{key}: {saved.get(key)} -> {current.get(key)}' for key in sorted(set(saved) | set(current))
               if key not in ignored and saved.get(key) != current.get(key)]

    def global_batch(config, ranks):
        return config.get('batch_size', 0) * config.get('grad_accum_steps', 1) * ranks

    if global_batch(saved, saved_world_size) != global_batch(current, world_size):
        changes.append(f'global batch: {global_batch(saved, saved_world_size)} -> {global_batch(current, world_size)}')
    return changes


def save_config(args: argparse.Namespace, path: str | os.PathLike) -> None:
    from .checkpoint import write_atomic
    write_atomic(path, yaml.safe_dump(resolved_config(args), sort_keys=False).encode())


def _where(args: argparse.Namespace, dest: str) -> str:
    return getattr(args, '_origins', {}).get(dest, '--' + dest.replace('_', '-'))


def _bound_text(low, high, low_open: bool, high_open: bool) -> str:
    """'in [0, 1)', '> 0' or '<= 1', as the bounds are given."""
    if low is not None and high is not None:
        return f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
    if low is not None:
        return f'{">" if low_open else ">="} {low}'
    return f'{"<" if high_open else "<="} {high}'


def _check_range(args, dest: str, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> None:
    """Every value of option ``dest`` (a number or a list of numbers) lies in the interval; the error names where
    the value came from (recipe file and key, or the command-line option)."""
    values = getattr(args, dest)
    for value in values if isinstance(values, list) else [values]:
        if value is None:
            continue
        if (low is not None and (value < low or (low_open and value == low))) or \
                (high is not None and (value > high or (high_open and value == high))):
            raise UsageError(f'{_where(args, dest)}: must be {_bound_text(low, high, low_open, high_open)}, '
                             f'got {value}')


FLOAT_RANGES = {  # dest: (low, high, low_open, high_open)
    'lr': (0, None, True, False), 'warmup_lr': (0, None, False, False), 'min_lr': (0, None, False, False),
    'momentum': (0, 1, False, True), 'weight_decay': (0, None, False, False), 'smoothing': (0, 1, False, True),
    'mixup': (0, None, False, False), 'cutmix': (0, None, False, False), 'hflip': (0, 1, False, False),
    'color_jitter': (0, None, False, False), 'crop_pct': (0, 1, True, False), 'scale': (0, 1, True, False),
    'ratio': (0, None, True, False), 'decay_rate': (0, None, True, False), 'decay_epochs': (0, None, True, False),
    'clip_grad': (0, None, True, False), 'pgt_alpha': (0, 1, False, False), 'diagnostics_mask': (0, 1, False, True),
    'lr_base': (0, None, True, False), 'std': (0, None, True, False), 'train_size_probs': (0, None, False, False),
    'train_size_schedule_spread': (0, None, False, False), 'train_size_random_mix': (0, 1, False, False),
}
INT_MINIMA = {'batch_size': 1, 'grad_accum_steps': 1, 'epochs': 1, 'log_interval': 1, 'max_skipped_steps': 1,
              'img_size': 1, 'val_img_size': 1, 'synthetic_steps': 1, 'lr_base_size': 1, 'signal_check_interval': 1,
              'diagnostics_interval': 1, 'num_classes': 1, 'global_batch_size': 1, 'workers': 0, 'seed': 0,
              'loader_timeout': 1, 'max_image_pixels': 1, 'train_img_sizes': 1,
              'warmup_epochs': 0, 'cooldown_epochs': 0, 'checkpoint_interval': 0, 'recovery_interval': 0,
              'pgt_start_epoch': 0, 'stop_after_epoch': 0, 'decay_milestones': 0, 'diagnostics_layers': 0}


def check_values(args: argparse.Namespace) -> None:
    """Every number finite and in its range, the pairs ordered, and PGT starting within the run."""
    for dest, value in vars(args).items():
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise UsageError(f'{_where(args, dest)}: must be a finite number, got {value}')
    for dest, (low, high, low_open, high_open) in FLOAT_RANGES.items():
        _check_range(args, dest, low, high, low_open, high_open)
    for dest, low in INT_MINIMA.items():
        _check_range(args, dest, low)
    for dest in ('scale', 'ratio'):
        if getattr(args, dest)[0] > getattr(args, dest)[1]:
            raise UsageError(f'{_where(args, dest)}: the minimum is above the maximum: {getattr(args, dest)}')
    if args.pgt_alpha is not None:
        from .optim import total_epochs
        epochs = total_epochs(args)
        if args.pgt_start_epoch >= epochs:
            raise UsageError(f'{_where(args, "pgt_start_epoch")}: {args.pgt_start_epoch} is not an epoch of this run '
                             f'(0-{epochs - 1}), so PGT would never be applied')


def resolve_learning_rate(args: argparse.Namespace, world_size: int) -> None:
    """timm's rule when --lr is not given: lr = lr_base x (global batch / lr_base_size), the ratio square-rooted for
    adaptive optimizers."""
    if args.lr is not None:
        return
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    scale = args.lr_base_scale or ('sqrt' if any(name in args.opt.lower() for name in ('ada', 'lamb')) else 'linear')
    ratio = global_batch / args.lr_base_size
    args.lr = args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


def resolve_data_settings(args: argparse.Namespace) -> None:
    """Image size, evaluation crop, interpolation and normalisation that were not given come from the model's default
    pretrained configuration, as timm's train.py resolves them (``resolve_data_config``); the resolved values are
    what config.yaml records, so a later timm with other defaults cannot change a resumed run."""
    import timm.data
    from .models import pretrained_data_config
    given = {'img_size': args.img_size, 'crop_pct': args.crop_pct, 'interpolation': args.interpolation,
             'mean': args.mean, 'std': args.std}
    config = timm.data.resolve_data_config(given, pretrained_cfg=pretrained_data_config(args.model))
    args.img_size = args.img_size or config['input_size'][-1]
    args.crop_pct = args.crop_pct or config['crop_pct']
    args.interpolation = args.interpolation or config['interpolation']
    args.mean = [float(m) for m in (args.mean or config['mean'])]
    args.std = [float(s) for s in (args.std or config['std'])]
    args.val_img_size = args.val_img_size or args.img_size


def finalize_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Checks that need the whole configuration (and the world size): the model, the per-GPU batch from the global
    one, the learning rate and data settings that default to timm's, and the ranges of every value."""
    from .models import check_model_name
    check_model_name(args.model)
    if args.global_batch_size is not None:
        per_update = world_size * args.grad_accum_steps
        if args.global_batch_size % per_update:
            raise UsageError(f'--global-batch-size {args.global_batch_size} is not divisible by world size '
                             f'{world_size} x grad-accum-steps {args.grad_accum_steps}')
        args.batch_size = args.global_batch_size // per_update
    resolve_learning_rate(args, world_size)
    resolve_data_settings(args)
    check_values(args)
    if (args.mixup or args.cutmix) and args.batch_size % 2:
        raise UsageError(f'mixup/cutmix need an even per-GPU batch, got {args.batch_size}')
    if args.clip_mode == 'agc' and args.clip_grad is None:
        raise UsageError('--clip-mode agc needs --clip-grad (the clip factor, e.g. 0.01)')
    if args.pgt_impl == 'hook' and (args.mixup or args.cutmix):
        raise UsageError(f'{_where(args, "pgt_impl")}: the published hook builds its targets from class indices; it '
                         f'never saw mixup or cutmix')
    check_train_sizes(args)
    if args.schedule_origin == 'fork' and args.sched_on_updates:
        raise UsageError(f'{_where(args, "schedule_origin")}: fork steps the schedule once per epoch, as the published '
                         f'code did; --sched-on-updates steps it every update')
    return args


def train_image_sizes(args: argparse.Namespace) -> list[int]:
    """The sizes training batches are cropped to."""
    return list(getattr(args, 'train_img_sizes', None) or [args.img_size])


def check_train_sizes(args: argparse.Namespace) -> None:
    """--train-img-sizes where this suite has them: in the torch backend's ImageNet folders (the size is attached
    to each sample by pgt.data.ShardedSampler; a DALI pipeline's crop size is fixed when it is built), with one
    weight per size, and two sizes at least for a progressive schedule (timm's rules, said with the recipe key)."""
    if not args.train_img_sizes:
        return
    where = _where(args, 'train_img_sizes')
    if args.data_backend != 'torch' or args.dataset != 'imagefolder':
        raise UsageError(f'{where}: scheduled training sizes need --data-backend torch on ImageNet-layout folders, '
                         f'not --data-backend {args.data_backend} --dataset {args.dataset}')
    if args.train_size_probs is not None and len(args.train_size_probs) != len(args.train_img_sizes):
        raise UsageError(f'{_where(args, "train_size_probs")}: {len(args.train_size_probs)} weight(s) for '
                         f'{len(args.train_img_sizes)} size(s) {args.train_img_sizes}')
    if args.train_size_probs is not None and not sum(args.train_size_probs) > 0:
        raise UsageError(f'{_where(args, "train_size_probs")}: the weights sum to 0')
    if args.train_size_schedule == 'progressive' and len(args.train_img_sizes) < 2:
        raise UsageError(f'{where}: a progressive schedule moves between sizes and needs two at least, got '
                         f'{args.train_img_sizes}')


def resolve_device_settings(args: argparse.Namespace, device) -> None:
    """What depends on the device the rank runs on, decided after that device is set (a CUDA query before it would
    open a context on GPU 0 in every rank): --amp-dtype auto, and --sync-bn, which torch implements for CUDA only."""
    if args.amp_dtype == 'auto':
        import torch
        capability = torch.cuda.get_device_capability(device) if device.type == 'cuda' else None
        args.amp_dtype = auto_amp_dtype(device.type, capability)
    if args.sync_bn and device.type != 'cuda':
        raise UsageError(f'{_where(args, "sync_bn")}: torch\'s SyncBatchNorm runs on CUDA devices only, and this run '
                         f'is on the {device.type}; leave it out')


def auto_amp_dtype(device_type: str, capability: tuple[int, int] | None) -> str:
    """bfloat16 where the hardware computes in it: CUDA compute capability 8.0 (Ampere) and newer, and CPUs.
    Volta (7.0) and Turing (7.5), the papers' V100 among them, only emulate it (``torch.cuda.is_bf16_supported``
    says True there), so they get float16 with a gradient scaler."""
    if device_type == 'cuda':
        return 'bfloat16' if capability is not None and capability >= (8, 0) else 'float16'
    return 'bfloat16'
