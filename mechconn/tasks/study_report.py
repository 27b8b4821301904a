"""The `reproduce` study's report: its table, its text and where its wall time went."""

from mechconn import timing


def format_table(record: dict) -> str:
  """Markdown: method x view accuracy (mean +- std over seeds) and the path barrier."""
  views = list(record["cue_model"]["views"])
  lines = ["| method | " + " | ".join(views) + " | loss barrier to cue model (cue data) |",
           "|---" * (len(views) + 2) + "|"]
  lines.append("| cue model | " + " | ".join(
      f"{record['cue_model']['views'][v]['accuracy']:.3f}" for v in views) + " | - |")
  for method, row in record["methods"].items():
    cells = [f"{row['views'][v]['mean']:.3f} +- {row['views'][v]['std']:.3f}" for v in views]
    b = row["loss_barrier_to_cue_model"]
    lines.append(f"| {method} | " + " | ".join(cells) + f" | {b['mean']:.3f} +- {b['std']:.3f} |")
  return "\n".join(lines)


def _test_cue_text(proportion: float) -> str:
  return ("" if proportion == 1.0 else
          f" (the cue, rand_cue and rand_img views treat the first {proportion:.0%} of each "
          "class, as the official fine-tuning script's test loaders)")


def format_report(record: dict) -> str:
  data = record["data"]
  return (f"# Fine-tuning study: {data['dataset']}, {data['cue']} cue on "
          f"{data['cue_proportion_of_cue_model']:.0%} of the cue model's training data\n\n"
          f"Test accuracy per view (mean +- std over seeds {record['seeds']}); the last column "
          f"is the loss barrier of the linear path from the cue model to the fine-tuned model, "
          f"on the cue view ({data['path_batchnorm']} for BatchNorm at each t).\n\n"
          f"{format_table(record)}\n\n"
          f"Fine-tuned on {data['num_clean']} clean examples (CBFT also on {data['num_cue']} "
          f"examples, {data.get('num_cue_cued', data['num_cue'])} of them cued, disjoint); "
          f"{data['num_test_per_view']} test examples per view"
          f"{_test_cue_text(data.get('test_cue_proportion', 1.0))}. "
          f"{_wall_time_text(record)}\n\n"
          "![view accuracies](views.png)\n\n![paths from the cue model](paths.png)\n")


def _wall_time_text(record: dict) -> str:
  """The wall time, the machine and where the seconds went (`timing`)."""
  machine = record.get("machine", {})
  text = (f"Wall time {record['wall_seconds']:.0f} s from the launch on {record['backend']} "
          f"({record['devices']} device(s)")
  if machine:
    text += (f"; {machine['cpu']}, {machine['cpu_cores']} cores, float32 matmul "
             f"{machine['matmul_gflops_float32']:.0f} GFLOP/s measured in this run")
  text += ")."
  if "wall_time" in record:
    text += "\n\n" + timing.format_breakdown(record["wall_time"])
  return text
