"""timm train.py options that this suite does not implement, so that an ``args.yaml`` written by timm's train.py can be
passed as ``--config``: its keys that are this suite's options are used, and those listed here are ignored, saying so.

The table: every key of the args.yaml that timm's train.py writes (its argument parser's destinations, 172 keys at
1.0.29; ``amp_impl`` from earlier 1.0 releases) that is not one of this suite's options, with timm's default and
whether a value other than the default changes what is trained or evaluated. A recipe that sets such an option away
from its default is refused (one line naming them) unless --allow-timm-ignored: training without it would not be the
run the file describes. Options that only change the machinery (logging, loaders, checkpoint history) are named in a
warning. A misspelt option is still an unknown key.
"""
from __future__ import annotations

from typing import Any, NamedTuple


class TimmOption(NamedTuple):
    default: Any
    changes_training: bool


def _options(changes_training: bool, **defaults) -> dict[str, TimmOption]:
    return {key: TimmOption(value, changes_training) for key, value in defaults.items()}


TIMM_ONLY_OPTIONS: dict[str, TimmOption] = {
    # data: labels, image modes and sample counts of other dataset kinds
    **_options(True, class_map='', input_img_mode=None, input_key=None, target_key=None, train_num_samples=None,
               val_num_samples=None),
    **_options(False, data=None, train_split='train', val_split='validation', dataset_trust_remote_code=False),
    # model: weights to start from, architecture and numerics
    **_options(True, pretrained=False, pretrained_path=None, initial_checkpoint='', no_resume_opt=False, gp=None,
               in_chans=None, input_size=None, head_init_scale=None, head_init_bias=None, model_dtype=None),
    **_options(False, validation_batch_size=None, fuser='', grad_checkpointing=False, fast_norm=False,
               torchscript=False, torchcompile_mode=None),
    # optimizer and schedule
    **_options(True, opt_eps=None, opt_betas=None, layer_decay=None, layer_decay_min_scale=0,
               layer_decay_no_opt_scale=None, opt_kwargs={}, lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0,
               lr_cycle_mul=1.0, lr_cycle_decay=0.5, lr_cycle_limit=1, lr_k_decay=1.0, epoch_repeats=0.0,
               start_epoch=None, patience_epochs=10),
    # augmentation, regularisation and losses
    **_options(True, no_aug=False, vflip=0.0, aa=None, aug_repeats=0, aug_splits=0, jsd_loss=False, bce_loss=False,
               bce_sum=False, bce_target_thresh=None, bce_pos_weight=None, reprob=0.0, remode='pixel', recount=1,
               resplit=False, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode='batch',
               mixup_off_epoch=0, drop=0.0, drop_connect=None, drop_path=None, drop_block=None, train_crop_mode=None,
               color_jitter_prob=None, grayscale_prob=None, gaussian_blur_prob=None),
    # batch norm, model EMA, knowledge distillation
    **_options(True, bn_momentum=None, bn_eps=None, dist_bn='reduce', split_bn=False, model_ema=False,
               model_ema_force_cpu=False, model_ema_decay=0.9998, model_ema_warmup=False, kd_model_name=None,
               kd_distill_type='logit', kd_loss_type='kl', kd_temperature=4.0, kd_student_feature_dim=None,
               kd_teacher_feature_dim=None, kd_token_distill_type='soft', distill_loss_weight=None,
               task_loss_weight=None),
    # variable image and batch sizes (NaFlex, multi-size training)
    **_options(True, naflex_loader=False, naflex_loss_scale='linear', naflex_max_seq_len=576,
               naflex_patch_size_probs=None, naflex_patch_sizes=None, naflex_patchify_channels_first=False,
               naflex_train_seq_lens=[128, 256, 576, 784, 1024], variable_batch_loss_scale='none',
               train_batch_sizes=None, train_batches_per_epoch=None),
    # evaluation: which checkpoint is best, test-time augmentation
    **_options(True, eval_metric='top1', tta=0),
    # machinery: loaders, checkpoint history, logging, devices
    **_options(False, worker_seeding='all', checkpoint_hist=10, save_images=False, amp_impl='native', no_ddp_bb=False,
               synchronize_step=False, pin_mem=False, no_prefetcher=False, experiment='', local_rank=0,
               use_multi_epochs_loader=False, log_wandb=False, wandb_project=None, wandb_tags=[], wandb_resume_id='',
               device='cuda', device_modules=None, val_interval=1),
}


def changed_options(ignored: dict[str, Any]) -> tuple[dict, dict]:
    """Of the timm-only options a recipe sets, those away from timm's default: (changing training, the others)."""
    changed = {key: value for key, value in ignored.items() if value != TIMM_ONLY_OPTIONS[key].default}
    training = {key: value for key, value in changed.items() if TIMM_ONLY_OPTIONS[key].changes_training}
    return training, {key: value for key, value in changed.items() if key not in training}


def _listing(options: dict) -> str:
    return '; '.join(f'{key}: {value!r}' for key, value in options.items())


def refusal_line(source: str, training: dict) -> str:
    return (f'{source}: timm option(s) that this suite does not implement and that change the training: '
            f'{_listing(training)}; train without them with --allow-timm-ignored, or remove them')


def warning_line(source: str, ignored: dict) -> str | None:
    """The one warning for the timm options a recipe set away from timm's default (None when all are at it)."""
    training, others = changed_options(ignored)
    if not (training or others):
        return None
    return (f'{source}: {len(training) + len(others)} timm option(s) that this suite does not implement are ignored: '
            f'{_listing({**training, **others})}')
