"""The plan's report.html in a real headless browser (Debian's chromium, no network): every chart draws at
its size with its points and fitted curves, and a screenshot is taken."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tansuo.plan import PlanOptions, plan_study
from tests.helpers import browse
from tests.plan.helpers import SIZES, synthetic_results, write_study

pytestmark = pytest.mark.slow

PROBE = """<script>
var probe = {};
document.querySelectorAll('svg.plot').forEach(function(svg){
  var box = svg.getBoundingClientRect();
  probe[svg.id] = {width: box.width, height: box.height, points: svg.querySelectorAll('.point').length,
                   fits: svg.querySelectorAll('polyline.fit').length,
                   bands: svg.querySelectorAll('.band').length};
});
var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(probe);
document.body.appendChild(pre);
</script>"""


def test_plan_report_in_headless_chromium(tmp_path: Path) -> None:
    study = write_study(tmp_path / "study", synthetic_results())
    options = PlanOptions(budget=1e16, holdout="largest", bootstrap=5)
    plan, paths = plan_study(study, options, tmp_path / "out")
    probed = tmp_path / "probed.html"
    probed.write_text(paths["html"].read_text().replace("</body>", PROBE + "</body>"))
    dom = browse(probed, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert match, "the page's scripts did not run"
    plots = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    trials = len(plan["points"])
    assert plots["plot-tokens"]["points"] == trials and plots["plot-tokens"]["fits"] == len(SIZES)
    assert plots["plot-parity"]["points"] == trials
    assert plots["plot-frontier"]["points"] == trials + 1 and plots["plot-frontier"]["fits"] == 1  # + budget
    assert plots["plot-holdout"]["points"] == 4 and plots["plot-holdout"]["bands"] == 1
    assert all(p["width"] > 300 and p["height"] > 200 for p in plots.values())

    shot = tmp_path / "plan.png"
    done = browse(paths["html"], f"--screenshot={shot}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
