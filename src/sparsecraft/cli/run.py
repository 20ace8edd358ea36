"""`sparsecraft run recipe.yaml`: run the stages of a recipe, skipping the ones already done."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="run a YAML recipe: prune -> refine -> finetune -> quantize -> compress -> eval -> bench",
        description="Run the stages of a recipe in order. The whole file is checked before anything runs; "
                    "finished stages are skipped on a rerun; OUT/summary.json and OUT/report/ are written "
                    "at the end. See recipes/ for examples.")
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file")
    p.add_argument("--check", action="store_true", help="only check the recipe and list its stages")
    p.add_argument("--force", action="store_true", help="rerun every stage, even those done before")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..recipes import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    if args.check:
        print(f"{recipe.path}: recipe {recipe.name}, model {recipe.model}, output {recipe.out}")
        for st in recipe.stages:
            fields = ", ".join(f"{k}={v}" for k, v in st.fields.items())
            print(f"  {st.dirname}: {fields}")
        return 0
    summary = run_recipe(recipe, force=args.force)
    width = max(len(n) for n in summary["stages"])
    for name, st in summary["stages"].items():
        figs = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in (st.get("figures") or {}).items())
        secs = f"{st['seconds']:.1f} s" if st.get("seconds") is not None else ""
        print(f"{name:<{width}}  {st['status']:<22} {secs:>9}  {figs}")
    print(f"summary: {summary['out']}/summary.json")
    if summary.get("report"):
        print(f"report: {summary['report']}")
    return 0
