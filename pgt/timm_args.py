"""timm train.py options that this suite does not implement, with timm's defaults, so that a timm ``args.yaml`` can be
passed as ``--config``: its keys that are this suite's options are used, and those listed here are reported in one
warning instead of failing the run as unknown keys would (a misspelt option is still an error).

From timm 1.0's train.py argument parser (dest: default). Options this suite implements under the same name (model,
lr, epochs, sched, smoothing, ...) are not listed: they are ordinary options of pgt.config.
"""
from __future__ import annotations

TIMM_ONLY_DEFAULTS = {
    # dataset
    'data': None, 'train_split': 'train', 'val_split': 'validation', 'class_map': '', 'input_img_mode': None,
    'input_key': None, 'target_key': None, 'dataset_trust_remote_code': False, 'train_num_samples': None,
    'val_num_samples': None,
    # model
    'pretrained': False, 'pretrained_path': None, 'initial_checkpoint': '', 'no_resume_opt': False, 'gp': None,
    'in_chans': None, 'input_size': None, 'validation_batch_size': None, 'fuser': '', 'grad_checkpointing': False,
    'fast_norm': False, 'head_init_scale': None, 'head_init_bias': None, 'torchscript': False, 'model_dtype': None,
    'torchcompile_mode': None,
    # optimizer and schedule
    'opt_eps': None, 'opt_betas': None, 'layer_decay': None, 'opt_kwargs': {}, 'lr_noise': None,
    'lr_noise_pct': 0.67, 'lr_noise_std': 1.0, 'lr_cycle_mul': 1.0, 'lr_cycle_decay': 0.5, 'lr_cycle_limit': 1,
    'lr_k_decay': 1.0, 'epoch_repeats': 0.0, 'start_epoch': None, 'patience_epochs': 10,
    # augmentation and regularisation
    'no_aug': False, 'vflip': 0.0, 'aa': None, 'aug_repeats': 0, 'aug_splits': 0, 'jsd_loss': False,
    'bce_loss': False, 'bce_sum': False, 'bce_target_thresh': None, 'bce_pos_weight': None, 'reprob': 0.0,
    'remode': 'pixel', 'recount': 1, 'resplit': False, 'cutmix_minmax': None, 'mixup_prob': 1.0,
    'mixup_switch_prob': 0.5, 'mixup_mode': 'batch', 'mixup_off_epoch': 0, 'drop': 0.0, 'drop_connect': None,
    'drop_path': None, 'drop_block': None, 'train_crop_mode': None,
    # batch norm
    'bn_momentum': None, 'bn_eps': None, 'dist_bn': 'reduce', 'split_bn': False,
    # model EMA
    'model_ema': False, 'model_ema_force_cpu': False, 'model_ema_decay': 0.9998, 'model_ema_warmup': False,
    # miscellaneous
    'worker_seeding': 'all', 'checkpoint_hist': 10, 'save_images': False, 'amp_impl': 'native', 'no_ddp_bb': False,
    'synchronize_step': False, 'pin_mem': False, 'no_prefetcher': False, 'experiment': '', 'eval_metric': 'top1',
    'tta': 0, 'local_rank': 0, 'use_multi_epochs_loader': False, 'log_wandb': False, 'wandb_project': None,
    'wandb_tags': [], 'wandb_resume_id': '', 'device': 'cuda', 'device_modules': None,
}


def ignored_options_line(source: str, ignored: dict) -> str:
    """One warning line for the timm options a recipe set that this suite does not implement: those set to another
    value than timm's default are named (ignoring them changes what is trained), the others only counted."""
    changed = {k: v for k, v in ignored.items() if v != TIMM_ONLY_DEFAULTS[k]}
    named = '; '.join(f'{k}: {v!r}' for k, v in changed.items())
    return (f'{source}: {len(ignored)} timm option(s) that this suite does not implement were ignored'
            + (f', {len(changed)} of them not at timm\'s default: {named}' if changed else ' (all at timm\'s default)'))
