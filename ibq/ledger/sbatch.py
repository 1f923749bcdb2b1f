"""The #SBATCH lines a sweep's Slurm job array would be submitted with, without Slurm: the composed
`hydra.launcher` node handed to submitit's executor as hydra-submitit-launcher hands it, then the
executor's own submission file, which is never written or submitted."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ibq.errors import UserError

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def sbatch_text(hydra_cfg: DictConfig, jobs: int) -> str:
    """The #SBATCH lines of the array of `jobs` jobs that `hydra_cfg` (a composition with its hydra node)
    would submit."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    launcher = OmegaConf.to_container(hydra_cfg.hydra.launcher, resolve=True)
    if launcher.get("_target_") != SLURM_LAUNCHER:
        name = OmegaConf.select(hydra_cfg, "cluster.name", default="?")
        raise UserError(f"--sbatch: cluster={name} does not submit to Slurm; choose cluster=slurm, slurm_gpu or slurm_multinode")
    # as SlurmLauncher.launch_batch: executor keys first, generic keys as they are, the rest prefixed
    folder = launcher.pop("submitit_folder")
    launcher.pop("_target_")
    executor = submitit.AutoExecutor(cluster="slurm", folder=folder, slurm_max_num_timeout=launcher.pop("max_num_timeout"))
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in launcher.items()})
    slurm = executor._executor  # the SlurmExecutor behind the AutoExecutor
    slurm.parameters["map_count"] = jobs  # as SlurmExecutor._internal_process_submissions does for an array
    text = slurm._make_submission_file_text("python -u -m submitit.core._submit " + folder, "preview")
    return "\n".join(line for line in text.splitlines() if line.startswith("#SBATCH"))


def sweep_sbatch(arguments: list[str], config_name: str, jobs: int) -> str:
    """The #SBATCH lines of `ibq-train -m <arguments>` (its first job's composition; the array holds `jobs`)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ibq.config import CONF_DIR, first_of_each_sweep
    from ibq.ledger.plan import composed

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
        cfg = composed(config_name, first_of_each_sweep(arguments, GlobalHydra.instance().config_loader()))
        return sbatch_text(cfg, jobs)
