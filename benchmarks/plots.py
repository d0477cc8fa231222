"""PNG plots of the scaling curves (``ctx.details["curve"]`` of each curve scenario).

matplotlib is needed only here, and only by the full run (``make bench`` installs the ``bench``
extra); everything else in the suite, and CI's smoke run, works without it.
"""

from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent / "plots"


def available():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw(details, directory, subtitle=""):
    """One PNG per curve found in ``details`` ({scenario: details}); returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for scenario_details in details.values():
        spec = scenario_details.get("curve")
        if not spec or not spec["x"]:
            continue
        figure, axes = plt.subplots(figsize=(7, 4.2), dpi=100)
        for label, ys in spec["series"].items():
            points = [(x, y) for x, y in zip(spec["x"], ys) if y is not None]
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        if spec.get("log_x"):
            axes.set_xscale("log")
        if spec.get("log_y"):
            axes.set_yscale("log")
        axes.set_xticks(spec["x"])
        axes.set_xticklabels([f"{x:,}" for x in spec["x"]], rotation=30 if len(spec["x"]) > 5 else 0)
        axes.minorticks_off()
        axes.set_title(spec["title"] + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
        axes.set_xlabel(spec["xlabel"])
        axes.set_ylabel(spec["ylabel"])
        axes.grid(True, alpha=0.3)
        if len(spec["series"]) > 1:
            axes.legend()
        figure.tight_layout()
        path = directory / spec["file"]
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written
