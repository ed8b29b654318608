"""Run infrastructure: launchers run the training entry point on one or many processes; loggers receive
its metrics records (tensorboard, wandb, mlflow)."""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register(register):
    register("launcher", "local", "plugins.launchers.local:make_local", "plugins.launchers.local:LocalConfig",
             doc="one process on this machine (CPU or one GPU)", default=True)
    register("launcher", "accelerate", "plugins.launchers.accelerate_launcher:make_accelerate",
             "plugins.launchers.accelerate_launcher:AccelerateConfig",
             doc="N processes per machine on M machines (gloo on CPU, NCCL on GPUs); works under torchrun too")
    register("launcher", "slurm", "plugins.launchers.slurm:make_slurm", "plugins.launchers.slurm:SlurmConfig",
             doc="a Slurm job through submitit (one task per GPU), requeued and resumed on preemption")
    register("logger", "tensorboard", "plugins.launchers.loggers:make_tensorboard",
             "plugins.launchers.loggers:TensorBoardConfig",
             doc="every number of metrics.jsonl as a TensorBoard scalar (needs pip install tensorboard)")
    register("logger", "wandb", "plugins.launchers.trackers:make_wandb", "plugins.launchers.trackers:WandbConfig",
             doc="every number of metrics.jsonl and the resolved config to a Weights & Biases run, offline into "
                 "RUN_DIR/wandb by default (needs pip install wandb)")
    register("logger", "mlflow", "plugins.launchers.trackers:make_mlflow", "plugins.launchers.trackers:MlflowConfig",
             doc="every number of metrics.jsonl as MLflow metrics and the resolved config as params, in a store "
                 "in RUN_DIR/mlflow by default (needs pip install mlflow)")
