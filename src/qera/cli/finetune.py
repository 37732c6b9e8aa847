"""``qera finetune | output-error``: QPEFT fine-tuning with curves; output error of adapter inits before training."""

from __future__ import annotations

from pathlib import Path

from qera.core.methods import METHODS
from qera.util.errors import QeraError
from qera.cli.common import (
    add_common,
    add_model,
    emit,
    is_encoder,
    load_for,
    output_dir,
    text_batches,
    text_source,
)

def add_parsers(sub) -> None:
    """Register ``finetune`` and ``output-error``."""
    from qera.finetune.qpeft import INITS

    p = sub.add_parser("finetune", help="QPEFT fine-tuning (GLUE TSV tasks or causal LM) with curves")
    add_model(p); add_common(p)
    p.add_argument("--task", required=True, choices=["sst2", "mrpc", "stsb", "clm"])
    p.add_argument("--train", required=True, help="training file (GLUE TSV, or text for clm)")
    p.add_argument("--eval", required=True, help="evaluation file (GLUE TSV, or text for clm)")
    p.add_argument("--init", default="qera-approx", choices=[*INITS, "lora"], help="adapter init; 'lora' = 16-bit LoRA, no quantization")
    p.add_argument("--format", default="mxint3")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--loftq-iters", type=int, default=5)
    p.add_argument("--calib-text", help="unlabeled text for the init statistics (default: built-in)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="refine the init block by block first (STEPS per block; sequential pipeline, see "
                        "qera quantize --refine); the adapters start from the refined A, B and the base is the refined W̃")
    p.add_argument("--refine-lr", type=float, default=1e-3)
    p.add_argument("--refine-train", default="auto", help="lowrank, scales, rounding, a comma list, or auto (default: "
                   "lowrank,rounding where the format allows)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256, help="clm window length")
    p.add_argument("--max-train-samples", type=int)
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: every epoch)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-model", action="store_true", help="also save adapter + quantized base")
    p.add_argument("--out", required=True); p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("output-error", help="model output error of each adapter init before training (table + PNG)")
    add_model(p); add_common(p)
    p.add_argument("--formats", default="mxint3,mxint2:block=16")
    p.add_argument("--inits", default="qlora,loftq,qera-approx,qera-exact")
    p.add_argument("--ranks", default="4,8,16,32")
    p.add_argument("--loftq-iters", type=int, default=5, help="LoftQ is evaluated at 1..N iterations")
    p.add_argument("--calib-text"); p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--eval-text"); p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True); p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_output_error)


def cmd_finetune(args) -> int:
    """Quantize + initialize adapters (or plain 16-bit LoRA), fine-tune, log curves."""
    from qera.calibrate.forward import collect_statistics, find_targets
    from qera.io.data import load_text, tokenize
    from qera.finetune.trainer import TrainConfig, finetune_causal_lm, finetune_classifier, write_result
    from qera.util.memory import trim_heap
    from qera.evaluate.glue import TASKS, read_task
    from qera.io.models import load_encoder
    from qera.finetune.qpeft import QPEFTConfig, prepare_qpeft_model, save_qpeft
    from qera.quantize.pipeline import stats_kinds_for
    from qera.evaluate.plots import plot_curves

    out = output_dir(args)
    train_cfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                            eval_steps=args.eval_steps, logging_steps=args.logging_steps, seed=args.seed)
    clm = args.task == "clm"
    if clm:
        model, tok = load_for(args)
        task_type, save_modules = "CAUSAL_LM", None
        train_text, eval_text = load_text(args.train, "calibration"), load_text(args.eval, "evaluation")
    else:
        spec = TASKS.get(args.task)
        train = read_task(args.task, args.train, args.max_train_samples, args.seed)
        evaluation = read_task(args.task, args.eval, args.max_eval_samples, args.seed)
        model, tok = load_encoder(args.model, num_labels=spec.num_labels, seed=args.seed)
        task_type, save_modules = "SEQ_CLS", ["classifier", "pooler"]
    if args.init == "lora":  # 16-bit LoRA reference: no quantization
        from peft import LoraConfig, get_peft_model
        import torch

        lc = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=sorted(find_targets(model)),
                        modules_to_save=save_modules, task_type=task_type)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            pm = get_peft_model(model, lc)
    else:
        qcfg = QPEFTConfig(format=args.format, init=args.init, rank=args.rank, alpha=args.alpha,
                           init_options={"iters": args.loftq_iters} if args.init != "qlora" and METHODS.get(args.init).iterates else {},
                           modules_to_save=save_modules, task_type=task_type, seed=args.seed, cache_base=True,
                           refine_steps=args.refine, refine_lr=args.refine_lr, refine_train=args.refine_train)
        stats = calib = None
        kinds = stats_kinds_for(qcfg.quant_config())
        if kinds or args.refine:
            calib = text_batches(args, tok, text_source(args.calib_text, None), "calibration",
                                  args.calib_samples, args.calib_seq_len, args.seed)
        if kinds and not args.refine:  # the refinement's sequential run records its statistics block by block
            stats = collect_statistics(model, calib, list(find_targets(model)), kinds, progress=not args.no_progress)
        pm, _ = prepare_qpeft_model(model, qcfg, calibration=calib if args.refine else None, stats=stats,
                                    progress=not args.no_progress)
        del stats  # 4.7 GiB of Σxᵀx on a 0.5B model: not needed for training
        trim_heap()
    if clm:
        tr = tokenize(tok, train_text)
        n_tr = min(args.max_train_samples or 10**9, tr.numel() // args.seq_len)
        ev = tokenize(tok, eval_text)
        n_ev = min(args.max_eval_samples or 10**9, ev.numel() // args.seq_len)
        if n_tr < 1 or n_ev < 1:
            raise QeraError(f"train/eval text too short for --seq-len {args.seq_len}")
        train_ids = tr[: n_tr * args.seq_len].view(n_tr, args.seq_len)
        eval_ids = ev[: n_ev * args.seq_len].view(n_ev, args.seq_len)
        result = finetune_causal_lm(pm, tok, train_ids, eval_ids, train_cfg, out, progress=not args.no_progress)
    else:
        result = finetune_classifier(pm, tok, args.task, train, evaluation, train_cfg, out, progress=not args.no_progress)
    result.update({"model": args.model, "init": args.init, "format": None if args.init == "lora" else args.format,
                   "rank": args.rank, "alpha": args.alpha, "seed": args.seed, "refine_steps": args.refine})
    out.mkdir(parents=True, exist_ok=True)
    write_result(result, out / "result.json")
    metric = result["metric"]
    plot_curves({f"{args.init}": result["history"]}, metric, out / "curves.png",
                title=f"{args.model} {args.task} {args.init} {args.format if args.init != 'lora' else '16-bit'} r{args.rank}")
    if args.save_model and args.init != "lora":
        save_qpeft(pm, tok, out / "model", overwrite=True, config=qcfg)
    final = result["final"].get("eval_" + metric)
    emit(args, {"out": str(out), "metric": metric, "final": final},
          f"{args.task} {args.init}: final eval {metric} = {final:.4f}  (log: {out / 'result.json'}, curves: {out / 'curves.png'})")
    return 0


def cmd_output_error(args) -> int:
    """Figure 1 of the QERA paper: output error of each init before training, over ranks and LoftQ iterations."""
    from qera.analyze.init_error import output_error_sweep
    from qera.calibrate.forward import collect_statistics, find_targets
    from qera.finetune.trainer import write_result
    from qera.util.memory import trim_heap
    from qera.io.models import load_encoder, load_model
    from qera.evaluate.plots import plot_output_error

    out = output_dir(args)
    encoder = is_encoder(args.model)
    loader = (lambda: load_encoder(args.model)[0]) if encoder else (lambda: load_model(args.model, cache=args.cache_dir)[0])
    model, tok = load_encoder(args.model) if encoder else load_model(args.model, cache=args.cache_dir)
    calib = text_batches(args, tok, text_source(args.calib_text, None), "calibration", args.calib_samples, args.calib_seq_len, args.seed)
    stats = collect_statistics(model, calib, list(find_targets(model)), ("abs", "sq", "xtx"), progress=not args.no_progress)
    del model  # the sweep loads a fresh model for each init (loader)
    trim_heap()
    evaluation = text_batches(args, tok, text_source(args.eval_text, None), "evaluation", args.eval_samples, args.eval_seq_len, args.seed + 1)
    ranks = [int(r) for r in args.ranks.split(",")]
    inits = [i.strip() for i in args.inits.split(",")]
    rows: list[dict] = []

    def save_row(row: dict) -> None:  # partial results survive an interrupted sweep
        rows.append(row)
        write_result({"model": args.model, "complete": False, "rows": rows}, out / "output_error.json")

    for fmt in args.formats.split(","):
        output_error_sweep(loader, fmt, stats, evaluation, inits, ranks, args.loftq_iters,
                           progress=not args.no_progress, on_row=save_row, seed=args.seed)
    write_result({"model": args.model, "complete": True, "rows": rows}, out / "output_error.json")
    for fmt in args.formats.split(","):
        plot_output_error([r for r in rows if r["format"] == fmt], out / f"output_error_{fmt.replace(':', '_')}.png",
                          title=f"{Path(args.model).name} {fmt}: output error before training")
    lines = [f"{'format':<16} {'init':<12} {'rank':>4} {'iters':>5} {'output MSE':>12} {'KL':>10}"]
    for r in rows:
        kl = f"{r['kl']:.4g}" if "kl" in r else "-"  # encoders have no logits: MSE of hidden states only
        lines.append(f"{r['format']:<16} {r['init']:<12} {r['rank']:>4} {r['iters'] or '-':>5} {r['logit_mse']:>12.5g} {kl:>10}")
    emit(args, {"rows": rows}, "\n".join(lines))
    return 0
