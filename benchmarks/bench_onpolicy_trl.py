"""One on-policy step of the embedded default vs TRL's SDFT trainer, on the same weights and the same prompts.

Ours: the ``caopd demo`` configuration (preset included), a student warmed up for ``--warmup-steps`` supervised
steps so it answers in the task's format (the demo warms up 600), an EMA teacher, and ``Trainer.train_step``:
rollout (16 prompts x 8 samples, ``rollout/``), grading + rewrite, then the distillation step (teacher and
student forwards, full-vocabulary reverse KL, backward, AdamW, EMA update, replay rows).
TRL: that warmed-up student exported with the project's exporter (``tools/export_hf.py``), trained by
``trl.experimental.sdft.SDFTTrainer`` with ``distillation_mode="full_logits"``, ``distillation_alpha=1``
(reverse KL), an EMA teacher at the same rate, 128 completions per step (16 prompts x 8 generations) from HF
``generate``, the same learning rate and no gradient clipping; the teacher reads the same privileged prompts
(``teacher_prompt_template="{privileged_context}{prompt}"``, the privileged context being our teacher prompt).
No importance-sampling clip (ours has none).

TRL is an optional benchmark dependency, never a runtime one: it runs in a separate interpreter
(``--trl-python``, a virtual environment with ``pip install .[bench]``), fed a folder of exported weights and
prompts. Times are each process's CPU time per step (one torch thread each), medians over ``--steps`` steps
after ``--warm`` unmeasured ones; "generation" is the rollout (ours: ``prefix_rollout``; TRL: its
``_generate``), "rest" the remainder of the step.

    python benchmarks/bench_onpolicy_trl.py --trl-python /path/to/trl-venv/bin/python   # ~5 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ours_side(args, work: Path) -> dict:
    """Warm up, export, time our steps; writes the prompts for TRL to ``work/prompts.json``."""
    sys.path.insert(0, str(ROOT))
    import torch

    from caopd_megatron.calibration.revise import revise, student_prompt_text, teacher_prompt_text
    from caopd_megatron.checkpointing.hf import save_megatron_checkpoint
    from caopd_megatron.config.loader import load_config, preset_path
    from caopd_megatron.pipeline.session import build_student, build_teacher, open_session, train_prompts
    from caopd_megatron.pipeline.train import Trainer
    from caopd_megatron.pipeline.warmup import WarmupData, run_warmup, warmup_replay
    from caopd_megatron.rollout.engine import prefix_rollout

    torch.set_num_threads(1)
    cfg = load_config([preset_path("demo")], [f"run.output_dir={work / 'run'}", f"warmup.steps={args.warmup_steps}",
                                              "logging.progress=false", "run.threads=1"])
    s = open_session(cfg)
    train = train_prompts(s)
    student = build_student(s)
    data = WarmupData(train, s.tokenizer, cfg, seed=cfg.run.seed)
    run_warmup(student, data, cfg, s.vocab.real, s.tokenizer.pad_id)
    save_megatron_checkpoint(work / "ckpt", student, cfg.model, real_vocab_size=s.vocab.real,
                             tokenizer_dir=s.run_dir / "tokenizer")
    subprocess.run([sys.executable, str(ROOT / "tools" / "export_hf.py"), "--ckpt", str(work / "ckpt"), "--out",
                    str(work / "hf"), "--dtype", "float32", "--no-progress"], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    teacher = build_teacher(s, student)
    trainer = Trainer(cfg, student, teacher, s.tokenizer, s.vocab.real, train, work / "trainer",
                      replay=warmup_replay(data, s.vocab.real, s.tokenizer.pad_id))
    # The prompts both sides train on, in order (TRL gets the same batches; its sampler is told not to shuffle).
    n_steps = args.warm + args.steps
    order = [i for _ in range(n_steps) for i in trainer.cursor.take(cfg.rollout.prompts_per_step)]
    trainer.cursor = type(trainer.cursor)(len(train), cfg.run.seed)  # rewind: ours takes the same batches
    rows = []
    for i in order:  # the teacher prompt is the privileged context followed by the student prompt
        student_text = student_prompt_text(train[i], cfg.data)
        teacher_text = teacher_prompt_text(train[i], cfg.data, cfg.calibration, None)
        assert teacher_text.endswith(student_text), (teacher_text, student_text)
        note = teacher_text[: len(teacher_text) - len(student_text)]
        rows.append({"prompt": student_text, "privileged_context": note})
    (work / "prompts.json").write_text(json.dumps(rows))
    gen, rest, tokens = [], [], []
    for step in range(n_steps):
        batch = [trainer.prompts[i] for i in trainer.cursor.take(cfg.rollout.prompts_per_step)]
        t0 = time.process_time()
        rolls = prefix_rollout(trainer.student, trainer.teacher, batch, trainer.tok, cfg, trainer.real_vocab,
                               step=trainer.step)
        t1 = time.process_time()
        trainer.learn(revise(rolls, trainer.by_id, trainer.tok, cfg.data, cfg.calibration))
        t2 = time.process_time()
        if step >= args.warm:
            gen.append(t1 - t0)
            rest.append(t2 - t1)
            tokens.append(sum(len(r.response_ids) for r in rolls) / len(rolls))
    meta = dict(completions=len(rolls), max_new_tokens=cfg.rollout.max_new_tokens, lr=cfg.optim.lr,
                ema_rate=cfg.teacher.ema_rate, temperature=cfg.rollout.temperature, seed=cfg.run.seed,
                samples_per_prompt=cfg.rollout.samples_per_prompt, grad_clip=cfg.distill.grad_clip)
    (work / "meta.json").write_text(json.dumps(meta))
    return dict(summary(gen, rest, tokens), **meta)


def summary(gen: list[float], rest: list[float], tokens: list[float]) -> dict:
    med = statistics.median
    return dict(step_s=med([g + r for g, r in zip(gen, rest)]), generation_s=med(gen), rest_s=med(rest),
                completion_tokens=statistics.mean(tokens), steps=len(gen))


def trl_side(args, work: Path) -> dict:
    """TRL's SDFT trainer on the exported weights (run in the TRL interpreter)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    torch.set_num_threads(1)
    meta = json.loads((work / "meta.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    rows = json.loads((work / "prompts.json").read_text())
    n_steps = args.warm + args.steps
    config = SDFTConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=meta["completions"],
        num_generations=meta["samples_per_prompt"], max_completion_length=meta["max_new_tokens"],
        temperature=meta["temperature"], top_p=1.0, top_k=0, learning_rate=meta["lr"], max_steps=n_steps,
        max_grad_norm=meta["grad_clip"] or 0.0, teacher_model_kind="ema", teacher_update_rate=meta["ema_rate"],
        distillation_mode="full_logits", distillation_alpha=1.0, distillation_is_clip=None,
        teacher_prompt_template="{privileged_context}{prompt}", shuffle_dataset=False, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=meta["seed"], dataloader_num_workers=0, disable_tqdm=True)
    trainer = SDFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    gen_time, tokens = [0.0], []
    generate = trainer._generate

    def timed_generate(prompt_ids):
        t = time.process_time()
        out = generate(prompt_ids)
        gen_time[0] += time.process_time() - t
        tokens.append(statistics.mean(len(c) for c in out[1]))
        return out
    trainer._generate = timed_generate
    steps: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t, gen_time[0] = time.process_time(), 0.0

        def on_step_end(self, *a, **k):
            steps.append((time.process_time() - self.t, gen_time[0]))

    trainer.add_callback(StepTimer())
    trainer.train()
    kept = steps[args.warm:]
    return summary([g for _, g in kept], [s - g for s, g in kept], tokens[args.warm:])


def markdown(args, a: dict, b: dict) -> str:
    lines = [f"Command: `python benchmarks/bench_onpolicy_trl.py {' '.join(sys.argv[1:])}`", "",
             f"The embedded default's on-policy step ({a['completions']} completions = 16 prompts x "
             f"{a['samples_per_prompt']}, at most {a['max_new_tokens']} new tokens, full-vocabulary reverse KL, EMA "
             f"teacher) vs TRL {b.get('trl_version', '?')} `SDFTTrainer` (full_logits, alpha 1) on the same weights; "
             f"CPU seconds per step, median of {a['steps']} steps after {args.warm} unmeasured; one torch thread each; "
             f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", "",
             "| | step s | generation s | rest s | mean completion tokens |", "|---|---|---|---|---|"]
    for name, r in (("caopd (this engine)", a), ("TRL SDFTTrainer", b)):
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['generation_s']:.3f} | {r['rest_s']:.3f} "
                     f"| {r['completion_tokens']:.1f} |")
    lines += ["", f"TRL step / ours: {b['step_s'] / a['step_s']:.2f}x "
              f"(generation {b['generation_s'] / a['generation_s']:.2f}x, "
              f"rest {b['rest_s'] / a['rest_s']:.2f}x); above 1 = ours faster."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trl-python", default=None, help="interpreter with trl installed (default: this one)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per side")
    ap.add_argument("--warm", type=int, default=2, help="unmeasured first steps per side")
    ap.add_argument("--warmup-steps", type=int, default=60, help="supervised warm-up steps before the comparison")
    ap.add_argument("--side", choices=["both", "trl"], default="both", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help="keep the exported weights and prompts in this folder")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "onpolicy_trl")
    args = ap.parse_args()
    if args.side == "trl":
        import trl

        print(json.dumps(dict(trl_side(args, args.work), trl_version=trl.__version__)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        a = ours_side(args, work)
        print("ours:", json.dumps(a), flush=True)
        cmd = [args.trl_python or sys.executable, __file__, "--side", "trl", "--work", str(work), "--steps",
               str(args.steps), "--warm", str(args.warm)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the TRL side failed:\n{out.stderr[-4000:]}")
        b = json.loads(out.stdout.strip().splitlines()[-1])
        print("trl:", json.dumps(b), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(dict(ours=a, trl=b), indent=1) + "\n")
    text = markdown(args, a, b)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
