"""report.html in a real headless browser (Debian's chromium, no network): the plots draw, the table holds
every variant and sorts on a click, and a screenshot is taken."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tansuo.explore.report import write_report
from tansuo.explore.results import collect
from tests.explore.helpers import fake_study, spec_for
from tests.helpers import browse

pytestmark = pytest.mark.slow

# appended to a copy of the report: what the page looks like to a person, as JSON in the DOM
PROBE = """<script>
var probe = {plots: {}, rows: document.querySelectorAll('#variants tbody tr').length};
document.querySelectorAll('svg.plot').forEach(function(svg){
  var box = svg.getBoundingClientRect();
  probe.plots[svg.id] = {width: box.width, height: box.height,
                         points: svg.querySelectorAll('.point').length,
                         curves: svg.querySelectorAll('polyline.curve').length};
});
var heads = Array.prototype.slice.call(document.querySelectorAll('#variants th'));
var q = heads.findIndex(function(h){ return h.textContent === 'quality'; });
heads[q].click();
probe.ascending = Array.prototype.map.call(document.querySelectorAll('#variants tbody tr'),
  function(r){ return r.cells[q].getAttribute('data-v'); });
heads[q].click();
probe.descending = Array.prototype.map.call(document.querySelectorAll('#variants tbody tr'),
  function(r){ return r.cells[q].getAttribute('data-v'); });
var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(probe);
document.body.appendChild(pre);
</script>"""


def test_report_in_headless_chromium(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    paths = write_report(collect(fake_study(spec, bundle), spec, "memory"), tmp_path / "study")
    probed = tmp_path / "probed.html"
    probed.write_text(paths["html"].read_text().replace("</body>", PROBE + "</body>"))
    dom = browse(probed, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert match, "the page's scripts did not run"
    probe = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    plots = probe["plots"]
    assert plots["plot-quality-latency"]["points"] == 4 and plots["plot-quality-size"]["points"] == 4
    assert plots["plot-curves-train_loss"]["curves"] == 2 and plots["plot-curves-val_accuracy"]["curves"] == 2
    assert all(p["width"] > 300 and p["height"] > 200 for p in plots.values())
    assert probe["rows"] == 5  # four variants and the failed trial
    numbers = [float(v) for v in probe["ascending"] if v]
    assert numbers == sorted(numbers) and len(numbers) == 4
    assert [float(v) for v in probe["descending"] if v] == sorted(numbers, reverse=True)

    shot = tmp_path / "report.png"
    done = browse(paths["html"], f"--screenshot={shot}")
    assert done.returncode == 0, done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
