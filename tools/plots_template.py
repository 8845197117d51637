"""The page `dvc plots show` and `dvc plots diff` draw into, with Vega, Vega-Lite and Vega-Embed inside it.

DVC's own page loads the three libraries from a CDN, so it draws nothing offline. .dvc/config names this one
(plots.html_template): the same placeholders, and vl-convert's bundle of the libraries in a script element instead
of the CDN's. `make install` writes it; DVC reads it for every `dvc plots` command.
Run: python -m tools.plots_template
"""

from __future__ import annotations

from pathlib import Path

from tools.project import PLOTS_TEMPLATE, ROOT

VEGA_LITE = "5.21"  # the major version DVC's plot templates are written for
PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<script>BUNDLE</script>
<style>table { border-spacing: 15px; }</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def write(path: Path = PLOTS_TEMPLATE) -> Path:
    import vl_convert

    # The bundle inside a script element: no "</script" in it may end the element early.
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE).replace("</script", "<\\/script")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PAGE.replace("BUNDLE", bundle), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(f"wrote {write().relative_to(ROOT)}")
