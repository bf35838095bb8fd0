"""/dashboard in headless Chromium: a live server on the demo model with offloaded experts, traffic
in the background, and the page's heat maps checked pixel by pixel against /dashboard/data.

Chromium is Debian's package (`apt-get install chromium`), driven by Playwright without its own
browser download. The test skips, saying why, only when no Chromium binary is found. The
screenshot goes to $MOE_SERVE_ARTIFACTS/dashboard.png (default ./artifacts/dashboard.png).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from moe_serve.engine.model.demo_model import ensure_demo_model
from moe_serve.engine.offload.slot_pool import RESIDENCY_REFRESH_S
from tests.e2e.conftest import REPO_ROOT, server_process

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.e2e

CHROMIUM_ENV = "MOE_SERVE_CHROMIUM"
ARTIFACTS_ENV = "MOE_SERVE_ARTIFACTS"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
REFRESH_MS = 300
TASKS = ("chat", "code")  # of configs/tasks.yaml
RESIDENT_RGB = (37, 99, 235)  # the page's RESIDENT colour
EMPTY_RGB = (229, 231, 235)  # the page's EMPTY colour (host only / no lookups)
BACKGROUND_RGB = (255, 255, 255)
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser: $MOE_SERVE_CHROMIUM, else Debian's chromium on PATH; skips, saying why, without one."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        if not Path(explicit).is_file():
            pytest.skip(f"no Chromium at {CHROMIUM_ENV}={explicit}")
        return explicit
    found = next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)
    if found is None:
        pytest.skip(f"no Chromium: install Debian's `chromium` package (apt-get install -y chromium) or set {CHROMIUM_ENV}")
    return found


def artifact_path(name: str) -> Path:
    directory = Path(os.environ.get(ARTIFACTS_ENV) or REPO_ROOT / "artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory / name


@dataclass(frozen=True)
class DemoServer:
    base_url: str
    model: str


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServer]:
    """The demo model (4 MoE layers x 8 experts) with half its experts in the cache, next-layer
    prefetch and the repository's task table."""
    checkpoint = ensure_demo_model(tmp_path_factory.mktemp("dashboard-demo"))
    log_path = tmp_path_factory.mktemp("dashboard-log") / "server.log"
    flags = ["--max-model-len", "256", "--expert-cache-fraction", "0.5", "--prefetch", "next_layer",
             "--tasks-file", str(REPO_ROOT / "configs" / "tasks.yaml")]
    with server_process(checkpoint, flags, log_path) as (base_url, _process):
        model = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        yield DemoServer(base_url, model)


class Traffic:
    """Sampled completions for two tasks on a background thread until stopped."""

    def __init__(self, server: DemoServer) -> None:
        self._server = server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-traffic", daemon=True)
        self.num_requests = 0
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            with httpx.Client(base_url=self._server.base_url, timeout=60) as client:
                while not self._stop.is_set():
                    task = TASKS[self.num_requests % len(TASKS)]
                    body = {"model": self._server.model, "prompt": f"dashboard {self.num_requests}",
                            "max_tokens": 12, "temperature": 1.0, "seed": self.num_requests}
                    client.post("/v1/completions", json=body, headers={"X-Task": task}).raise_for_status()
                    self.num_requests += 1
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def wait_for(self, num_requests: int, timeout_s: float) -> None:
        """Until `num_requests` completions have returned (or the traffic failed)."""
        deadline = time.monotonic() + timeout_s
        while self.num_requests < num_requests and self.error is None and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        self.__exit__()
        assert self.error is None, f"traffic failed: {self.error!r}"


# per canvas: its size and how many pixels are the resident colour, the empty colour, the
# background, or any other colour (the hit/miss scale)
COUNT_PIXELS_JS = """([resident, empty, background]) => {
  const near = (data, i, rgb) => rgb.every((c, k) => Math.abs(data[i + k] - c) <= 2);
  const out = {};
  for (const id of ["residency", "hit-miss"]) {
    const canvas = document.getElementById(id);
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    const counts = {width: canvas.width, height: canvas.height, resident: 0, empty: 0, background: 0, other: 0};
    for (let i = 0; i < data.length; i += 4) {
      if (data[i + 3] === 0 || near(data, i, background)) counts.background++;
      else if (near(data, i, resident)) counts.resident++;
      else if (near(data, i, empty)) counts.empty++;
      else counts.other++;
    }
    out[id] = counts;
  }
  return out;
}"""


def refreshes(page: Page) -> int:
    """How many times the page has rendered fresh data."""
    return int(page.evaluate("Number(document.body.dataset.refreshes || 0)"))


def residency_tooltips(page: Page, layers: list[dict]) -> dict[tuple[int, int], str]:
    """The residency map's tooltip over the centre of each cell of the first two experts of each
    layer, by (layer, expert)."""
    box = page.eval_on_selector("#residency", "(canvas) => [canvas.width, canvas.height]")
    cell_width, cell_height = box[0] / max(layer["num_experts"] for layer in layers), box[1] / len(layers)
    tooltips = {}
    for row, layer in enumerate(layers):
        for expert in range(2):
            page.hover("#residency", position={"x": (expert + 0.5) * cell_width, "y": (row + 0.5) * cell_height})
            tooltips[layer["layer"], expert] = page.get_attribute("#residency", "title") or ""
    return tooltips


def test_dashboard_renders_the_heat_maps_with_data(chromium: str, demo_server: DemoServer,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from playwright.sync_api import sync_playwright

    page_errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.on("console", lambda message: message.type == "error" and page_errors.append(message.text))
            with Traffic(demo_server) as traffic:
                page.goto(f"{demo_server.base_url}/dashboard?interval={REFRESH_MS}")
                # tokens are flowing and the hit/miss map has at least two columns of deltas
                page.wait_for_function("Number(document.body.dataset.refreshes) >= 6 && "
                                       "parseFloat(document.getElementById('tok-per-s').textContent) > 0",
                                       timeout=TIMEOUT_MS)
                tok_per_s = float(page.text_content("#tok-per-s") or "nan")
                traffic.wait_for(len(TASKS), timeout_s=TIMEOUT_MS / 1000)
                traffic.stop()
            # idle now: once the engine republished its settled residency (a refresh period after its
            # last step), the next refresh draws the residency the JSON reports
            time.sleep(RESIDENCY_REFRESH_S + 0.5)
            data = httpx.get(f"{demo_server.base_url}/dashboard/data", timeout=10).json()
            seen = refreshes(page)
            page.wait_for_function(f"Number(document.body.dataset.refreshes) >= {seen + 2}", timeout=TIMEOUT_MS)
            pixels = page.evaluate(COUNT_PIXELS_JS, [RESIDENT_RGB, EMPTY_RGB, BACKGROUND_RGB])
            texts = {element: page.text_content(f"#{element}") or "" for element in
                     ("generated", "hit-rate", "prefetch-counts")}
            table = page.evaluate("[...document.querySelectorAll('#tasks tbody tr')]"
                                  ".map((row) => [...row.cells].map((cell) => cell.textContent))")
            tooltips = residency_tooltips(page, data["expert_cache"]["layers"])
            screenshot = artifact_path("dashboard.png")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    with capsys.disabled():
        print(f"\ndashboard screenshot: {screenshot}")

    assert not page_errors, page_errors
    assert traffic.num_requests > 0 and tok_per_s > 0
    assert int(texts["generated"]) == data["tokens"]["generated"] > 0
    layers = data["expert_cache"]["layers"]
    hits, misses = sum(layer["hits"] for layer in layers), sum(layer["misses"] for layer in layers)
    assert float(texts["hit-rate"].split()[0]) == pytest.approx(100 * hits / (hits + misses), abs=0.051)
    assert int(texts["prefetch-counts"].split("/")[0]) == data["expert_cache"]["prefetch"]["issued"] > 0
    assert sum(row["slo_requests"] for row in data["tasks"]) == traffic.num_requests  # every request judged
    judged = {row["task"]: f"{row['slo_attained']} / {row['slo_requests']}" for row in data["tasks"]}
    assert {cells[0]: cells[4] for cells in table} == judged  # the table's "SLO met / judged" column
    assert all(int(judged[task].split("/")[1]) > 0 for task in TASKS)

    num_experts = max(layer["num_experts"] for layer in layers)
    residency = pixels["residency"]
    cell_pixels = (residency["width"] // num_experts - 1) * (residency["height"] // len(layers) - 1)
    num_resident = sum(len(layer["resident"]) for layer in layers)
    assert num_resident > 0
    assert residency["resident"] == num_resident * cell_pixels  # one filled cell per resident expert
    assert residency["empty"] == (num_experts * len(layers) - num_resident) * cell_pixels
    for (layer, expert), tooltip in tooltips.items():
        resident = expert in next(row["resident"] for row in layers if row["layer"] == layer)
        assert tooltip == f"layer {layer}, expert {expert}: {'holds a cache slot' if resident else 'host only'}"
    heat = pixels["hit-miss"]
    assert heat["other"] > 0  # cells coloured by an interval's hit rate
