"""The ``seer-attn`` command line (the console script).

    seer-attn <every command of seer_attn.eval.cli>   demo, distill, eval, compare, benchmarks, ...
    seer-attn export --model ... --output DIR [--gates-only] [--results ENV.json ...]
    seer-attn push DIR --repo-id NAMESPACE/NAME [--private] [--revision B] [--create-pr]

and ``--push-to-hub REPO`` on the training commands (``distill``, ``finetune``): after
training, the model folder is exported with its card (from the run's results envelopes) to
``OUTPUT/hub`` and pushed, as transformers' Trainer users expect. ``distill`` can push the
gates alone (``--push-gates-only``); ``finetune`` changes the weights, so it pushes the whole
model (a LoRA adapter merged into its base).

The dispatcher lives here rather than in eval/ because data flows one way (docs/design.md §3):
export and push render cards from eval's results, so eval cannot import them.
:func:`seer_attn.eval.cli.main` does the parsing with this module's command table.

A training command's ``func`` must return a dict with ``model_dir`` (the trained folder) and
may name ``summary_path`` (its results envelope), ``eval_path`` (the envelope of its closing
evaluation), ``calibration_path`` (``distill --calibrate-density``: the setting to ship) and
``model`` (the base it started from): :func:`run_then_push` exports from them.
"""
import os
import sys

from seer_attn.eval import cli as eval_cli

#: commands that gain --push-to-hub (when eval's table has them and they parse their options here),
#: and whether they offer --push-gates-only (finetune changes the base weights: never gates alone)
TRAINING_COMMANDS = {"distill": True, "finetune": False}
HUB_FOLDER = "hub"


def _export(p):
    from .export import add_export_args, run_export
    add_export_args(p)
    p.set_defaults(func=run_export)


def _push(p):
    from .push import add_push_args, run_push
    add_push_args(p)
    p.set_defaults(func=run_push)


def _with_push_to_hub(add, gates_only=True):
    """``add`` (a training command's option adder) plus the ``--push-to-hub`` options
    (``--push-gates-only`` when ``gates_only``), its ``func`` wrapped by :func:`run_then_push`."""
    def add_with_push(p):
        from .push import repo_id_arg
        add(p)
        hub = p.add_argument_group("upload to the Hugging Face Hub")
        hub.add_argument("--push-to-hub", metavar="REPO", type=repo_id_arg, default=None,
                         help=f"after training, export the model with its card to OUTPUT/{HUB_FOLDER} and push it to "
                              "this Hub repo (checked before training: a valid id, online, logged in)")
        if gates_only:
            hub.add_argument("--push-gates-only", action="store_true",
                             help="push the gates and a config naming the base model (--model) instead of the whole "
                                  "model")
        hub.add_argument("--push-private", action="store_true", help="create the Hub repo private")
        run = p.get_default("func")
        p.set_defaults(func=lambda args: run_then_push(run, args))
    return add_with_push


def run_then_push(run, args):
    """``run(args)`` (a training command), then, with ``--push-to-hub``, export its model folder
    and push it (:mod:`.export`, :mod:`.push`); what can be checked is checked before training."""
    from seer_attn.training.cli_args import user_input

    from .export import ExportOptions, export, listing, resolve_base
    from .push import check_online, check_token, push_folder
    repo = getattr(args, "push_to_hub", None)
    gates_only = getattr(args, "push_gates_only", False)
    folder = os.path.join(args.output, HUB_FOLDER)
    if repo:
        with user_input():
            check_online("--push-to-hub")
            check_token()
            if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
                raise ValueError(f"--push-to-hub writes the upload folder {folder}, which exists: remove it or choose "
                                 "another --output")
            if gates_only and not resolve_base(ExportOptions(output=folder, model=args.model), None).hub:
                raise ValueError(f"--push-gates-only names --model {args.model!r} as the base, and others cannot load "
                                 "a local path: distill a Hub model, or push the whole model (without "
                                 "--push-gates-only)")
    res = run(args)
    if not repo:
        return res
    if not isinstance(res, dict) or not res.get("model_dir"):
        raise RuntimeError(f"--push-to-hub: the command returned no model folder ({type(res).__name__})")
    results = [p for p in (res.get("summary_path"), res.get("eval_path"), res.get("calibration_path"))
               if p and os.path.isfile(p)]
    opts = ExportOptions(output=folder, model=res["model_dir"], gates_only=gates_only, base=res.get("model"),
                         results=results, repo_id=repo)
    print(listing(export(opts)), flush=True)
    with user_input():
        url = push_folder(folder, repo, private=True if args.push_private else None)
    print(f"[push] {url}", flush=True)
    return res


def _commands():
    table = {}
    for name, (help_, add) in eval_cli.COMMANDS.items():
        if name in TRAINING_COMMANDS and callable(add):
            add = _with_push_to_hub(add, gates_only=TRAINING_COMMANDS[name])
        table[name] = (help_, add)
    table["export"] = ("write a model folder for the Hub (full or gates-only) with its model card", _export)
    table["push"] = ("check an exported folder and upload it to the Hugging Face Hub", _push)
    return table


#: name: (one-line help, option adder or forwarded module), as in seer_attn.eval.cli.COMMANDS
COMMANDS = _commands()


def main(argv=None):
    return eval_cli.main(argv, commands=COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
