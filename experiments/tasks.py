"""config.task -> the library function that runs it: f(config, workdir, *, overwrite)."""

from mechconn import connectivity
from mechconn import drivers
from mechconn import reproduce
from mechconn import train

TASKS = {
    "linear_barrier": drivers.linear_barrier,
    "train": train.train_and_evaluate,
    "fit_curve": connectivity.fit_curve,
    "eval_path": connectivity.eval_path,
    "reproduce": reproduce.reproduce,
    "finetune": reproduce.finetune_task,
}
