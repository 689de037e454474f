"""The web page at `/`, in real headless Chromium (Debian's, driven by Playwright) against the real server:
pick an image and see the runtime's own top-1, send feedback and find it in the database, draw and classify
the drawing, and a protected server that answers only once the token is typed in."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import pytest
from PIL import Image

from helpers import animals
from helpers.serving import make_repo, running_server
from tandem.runtime import Predictor

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install chromium; never `playwright install`)"),
]

TOKEN = "web-test-token-5f0c"
ADMIN = "web-test-admin-9a71"
# What Chromium itself logs for a fetch() that the server answered with an error status; expected only
# where a test provokes that status.
NETWORK_ERROR = re.compile(r"^Failed to load resource: the server responded with a status of (\d{3})")


@pytest.fixture
def repo(tmp_path, tiny_bundle) -> Path:
    return make_repo(tmp_path / "repo", tiny_bundle)


@pytest.fixture
def predictor(tiny_bundle) -> Predictor:
    return Predictor.load(tiny_bundle)


@pytest.fixture
def animal_png(tmp_path) -> Path:
    x, _ = animals(1)
    path = tmp_path / "animal.png"
    Image.fromarray(x[3]).save(path)  # uint8 (28, 28): a grey PNG, as a camera module would send
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


class Watched:
    """A page whose console errors, uncaught exceptions and requests are recorded."""

    def __init__(self, browser, **context_options):
        self.context = browser.new_context(**context_options)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def check(self, base: str, expected_statuses: set[int] = frozenset()) -> None:
        """No console errors but Chromium's own line for each error status the test provoked on purpose;
        nothing fetched from anywhere but the server (the page is self-contained)."""
        unexpected = [e for e in self.errors
                      if not ((m := NETWORK_ERROR.match(e)) and int(m.group(1)) in expected_statuses)]
        assert unexpected == [], f"console errors on the page: {unexpected}"
        foreign = [u for u in self.requests if not u.startswith((base + "/", "data:", "blob:"))]
        assert foreign == [], f"the page fetched from elsewhere: {foreign}"


@pytest.fixture
def open_page(browser):
    pages = []

    def open_(base: str, **context_options) -> Watched:
        watched = Watched(browser, **context_options)
        pages.append(watched)
        watched.page.goto(base + "/")
        return watched

    yield open_
    for watched in pages:
        watched.context.close()


def test_upload_shows_the_runtimes_answer_and_feedback_lands_in_the_database(repo, tmp_path, animal_png, predictor,
                                                                              open_page, monkeypatch):
    from playwright.sync_api import expect

    monkeypatch.setenv("TANDEM_WEB_TEST_ADMIN", ADMIN)
    url = f"sqlite:///{tmp_path}/db.sqlite"
    expected = predictor.top_k([animal_png])[0]
    labels = predictor.labels
    with running_server(repo, {"store": {"url": url}, "auth": {"admin_token_env": "TANDEM_WEB_TEST_ADMIN"}}) as base:
        watched = open_page(base)
        page = watched.page
        expect(page).to_have_title("tandem serve")
        expect(page.locator("#model")).to_have_value("animals")
        expect(page.locator("#version")).to_have_value("")  # "latest"
        expect(page.locator("#version option").first).to_have_text("latest (1)")

        page.set_input_files("#file", str(animal_png))
        bars = page.locator("#results .bar")
        expect(bars).to_have_count(5)
        first = bars.first
        assert first.get_attribute("data-label") == expected[0].label
        assert abs(float(first.get_attribute("data-probability")) - expected[0].probability) < 1e-3
        expect(first).to_contain_text(expected[0].label)
        expect(first).to_contain_text(f"{100 * expected[0].probability:.1f}%")
        shown = [float(bars.nth(i).get_attribute("data-probability")) for i in range(5)]
        assert shown == sorted(shown, reverse=True) and sum(shown) <= 1 + 1e-6
        # The bars are drawn: each fill is its probability's share of its track.
        for i in range(5):
            fill = bars.nth(i).locator(".bar-fill").bounding_box()
            track = bars.nth(i).locator(".bar-track").bounding_box()
            assert fill["height"] > 0 and abs(fill["width"] / track["width"] - shown[i]) < 0.01

        meta = page.locator("#meta")
        expect(meta).to_be_visible()
        expect(meta).to_contain_text("model animals")
        expect(meta).to_contain_text("version 1")
        expect(meta).to_contain_text(re.compile(r"latency [\d.]+ ms \(queue [\d.]+ ms, compute [\d.]+ ms\)"))
        prediction_id = re.search(r"prediction ([0-9a-f]{32})", meta.inner_text()).group(1)
        expect(page.locator("#error")).to_be_hidden()

        # The feedback select offers the model's labels, the top-1 preselected; the user says otherwise.
        choice = page.locator("#feedback-label")
        expect(choice).to_have_value(expected[0].label)
        assert choice.locator("option").all_inner_texts() == labels
        truth = next(label for label in labels if label != expected[0].label)
        choice.select_option(truth)
        page.click("#send-feedback")
        status = page.locator("#feedback-status")
        expect(status).to_have_text(re.compile(r"^thanks: stored as feedback #\d+$"))
        feedback_id = int(status.inner_text().rsplit("#", 1)[1])

        # Through the API, with the admin token.
        answer = httpx.get(f"{base}/v1/feedback", params={"model": "animals"},
                           headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert answer.status_code == 200, answer.text
        rows = [r for r in answer.json()["feedback"] if r["prediction_id"] == prediction_id]
        assert [(r["id"], r["label"], r["model"], r["version"], r["image_stored"]) for r in rows] == \
            [(feedback_id, truth, "animals", 1, True)]
        # The stored image is the file the browser sent, byte for byte.
        image = httpx.get(f"{base}/v1/feedback/{feedback_id}/image", headers={"Authorization": f"Bearer {ADMIN}"},
                          timeout=10)
        assert image.status_code == 200 and image.content == animal_png.read_bytes()
        watched.check(base)

    # And in the database itself, once the server has stopped.
    from tandem.serve.store import Store

    store = Store(url)
    try:
        rows = [r for r in store.feedback(model="animals") if r["prediction_id"] == prediction_id]
        assert [(r["id"], r["label"]) for r in rows] == [(feedback_id, truth)]
        assert store.prediction(prediction_id)["model"] == "animals"
    finally:
        store.close()


def _draw(page, strokes: list[list[tuple[float, float]]]) -> None:
    """Mouse strokes on #canvas, in fractions of its size."""
    box = page.locator("#canvas").bounding_box()
    for stroke in strokes:
        (x0, y0), rest = stroke[0], stroke[1:]
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        for x, y in rest:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=8)
        page.mouse.up()


def _canvas_png(page) -> bytes:
    data_url = page.evaluate("document.getElementById('canvas').toDataURL('image/png')")
    return base64.b64decode(data_url.split(",", 1)[1])


def test_a_drawing_is_classified_and_errors_show_the_servers_message(repo, tmp_path, predictor, open_page):
    from playwright.sync_api import expect

    with running_server(repo, {"store": {"url": f"sqlite:///{tmp_path}/db.sqlite"}}) as base:
        # A phone-size viewport, touch-capable: the page must still fit and work.
        watched = open_page(base, viewport={"width": 390, "height": 844}, has_touch=True)
        page = watched.page
        expect(page.locator("#model")).to_have_value("animals")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, "the page scrolls sideways on a phone"

        # Clear really clears; the canvas starts black.
        _draw(page, [[(0.2, 0.2), (0.8, 0.8)]])
        page.click("#clear")
        blank = Image.open(io.BytesIO(_canvas_png(page))).convert("L")
        assert blank.getextrema() == (0, 0)

        _draw(page, [[(0.3, 0.25), (0.7, 0.25), (0.7, 0.75), (0.3, 0.75), (0.3, 0.25)], [(0.5, 0.3), (0.5, 0.7)]])
        drawing = _canvas_png(page)
        grey = Image.open(io.BytesIO(drawing)).convert("L")
        assert grey.getextrema() == (0, 255), "the strokes did not reach the canvas"
        page.click("#classify-drawing")
        bars = page.locator("#results .bar")
        expect(bars).to_have_count(5)
        probabilities = [float(bars.nth(i).get_attribute("data-probability")) for i in range(5)]
        assert all(0 <= p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-6
        assert probabilities == sorted(probabilities, reverse=True)
        # What the server got is the canvas as a PNG: the runtime on those bytes agrees.
        (tmp_path / "drawing.png").write_bytes(drawing)
        expected = predictor.top_k([tmp_path / "drawing.png"])[0][0]
        assert bars.first.get_attribute("data-label") == expected.label
        assert abs(probabilities[0] - expected.probability) < 1e-3
        expect(page.locator("#feedback-label")).to_have_value(expected.label)

        # A file that is no image: the server's own one-line message, visibly; the old bars are gone.
        bad = tmp_path / "not-an-image.png"
        bad.write_bytes(b"this is not a PNG at all\n")
        direct = httpx.post(f"{base}/v1/models/animals/classify", content=bad.read_bytes(), timeout=10)
        assert direct.status_code == 400, direct.text
        page.set_input_files("#file", str(bad))
        error = page.locator("#error")
        expect(error).to_be_visible()
        expect(error).to_contain_text(direct.json()["error"])
        expect(bars).to_have_count(0)
        expect(page.locator("#feedback")).to_be_hidden()
        watched.check(base, expected_statuses={400})


def test_a_protected_server_needs_the_token_typed_in(repo, tmp_path, animal_png, predictor, open_page, monkeypatch):
    from playwright.sync_api import expect

    monkeypatch.setenv("TANDEM_WEB_TEST_TOKEN", TOKEN)
    config = {"store": {"url": f"sqlite:///{tmp_path}/db.sqlite"}, "auth": {"token_env": "TANDEM_WEB_TEST_TOKEN"}}
    with running_server(repo, config) as base:
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        watched = open_page(base)
        page = watched.page
        error = page.locator("#error")
        expect(error).to_be_visible()
        expect(error).to_contain_text("this server needs a token")
        expect(page.locator("#model")).to_be_disabled()

        token = page.locator("#token")
        expect(token).to_be_visible()
        with page.expect_response(lambda r: r.url == f"{base}/v1/models" and r.status == 401):
            token.fill("wrong-token")
        expect(error).to_contain_text("this server needs a token")
        token.fill(TOKEN)
        expect(page.locator("#model")).to_have_value("animals")
        expect(error).to_be_hidden()

        page.set_input_files("#file", str(animal_png))
        bars = page.locator("#results .bar")
        expect(bars).to_have_count(5)
        assert bars.first.get_attribute("data-label") == predictor.top_k([animal_png])[0][0].label
        page.click("#send-feedback")
        expect(page.locator("#feedback-status")).to_have_text(re.compile(r"^thanks: stored as feedback #\d+$"))

        # The token is kept in this browser: a reload needs no typing.
        page.reload()
        expect(page.locator("#token")).to_have_value(TOKEN)
        expect(page.locator("#model")).to_have_value("animals")
        expect(error).to_be_hidden()
        watched.check(base, expected_statuses={401})


def test_the_heatmap_and_the_rule_path_show_under_the_top_5_bars(tiny_bundle, tmp_path, animal_png, open_page):
    from playwright.sync_api import expect

    from tandem.explain.occlusion import occlusion
    from tandem.explain.rules import RuleSet
    from test_serve_explain import bundle_with_rules

    # "animals" has rules (fit as `tandem rules` does); "plain" is the same network without them.
    repo = make_repo(tmp_path / "repo", bundle_with_rules(tiny_bundle, tmp_path / "with-rules"))
    make_repo(repo, tiny_bundle, name="plain")
    fp32 = Predictor.load(tiny_bundle, precision="fp32")
    pixels = fp32.pixels([animal_png])
    expected = occlusion(fp32, pixels[0])
    rules = RuleSet.load(repo / "animals" / "1")
    path = rules.explain(pixels)[0]
    with running_server(repo, {"store": {"url": f"sqlite:///{tmp_path}/db.sqlite"}}) as base:
        watched = open_page(base)
        page = watched.page
        expect(page.locator("#model")).to_have_value("animals")
        page.set_input_files("#file", str(animal_png))
        bars = page.locator("#results .bar")
        expect(bars).to_have_count(5)
        why = page.locator("#why")
        expect(page.locator("#why-body")).to_be_visible()
        label = fp32.labels[expected.target]
        expect(page.locator("#why-heading")).to_have_text(f"Why {label}?")
        caption = page.locator("#why-caption")
        expect(caption).to_contain_text(f"{100 * expected.probabilities[expected.target]:.1f}%")
        expect(caption).to_contain_text("169 covered copies (a 4 px window every 2 px)")
        # The heatmap is drawn, right over the image the model saw, and all of it under the bars.
        image, heatmap = page.locator("#why-image"), page.locator("#why-heatmap")
        for img in (image, heatmap):
            assert img.evaluate("i => i.complete && i.naturalWidth > 0"), "an image of the explanation did not load"
        assert heatmap.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [224, 224]
        assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [28, 28]
        box, over = image.bounding_box(), heatmap.bounding_box()
        assert box["width"] > 100 and all(abs(box[k] - over[k]) < 0.5 for k in box)
        last_bar = bars.nth(4).bounding_box()
        assert why.bounding_box()["y"] >= last_bar["y"] + last_bar["height"]
        # It is the server's heatmap, and the server's is the runtime's occlusion (tests/test_serve_explain.py).
        answer = httpx.post(f"{base}/v2/models/animals/versions/1/explain", content=animal_png.read_bytes(), timeout=30)
        assert heatmap.get_attribute("src") == "data:image/png;base64," + answer.json()["heatmap"]["png_base64"]
        page.uncheck("#why-toggle")
        expect(heatmap).to_be_hidden()
        page.check("#why-toggle")
        expect(heatmap).to_be_visible()

        # The rule path: RuleSet.explain's sentence, each condition with its concept's prototype strip (the very
        # bytes in the bundle, fetched with the page's token), and how far to trust it (the rules' fidelity).
        expect(page.locator("#rule-text")).to_have_text("Rule path: " + path["text"])
        # The path's two steps (which group, then which animal in it), each condition under its step with where
        # its concept fired in this image and the regions where it fires most.
        steps = page.locator("#rule-conditions li.rule-step")
        levels = sorted({c["level"] for c in path["conditions"]})
        expect(steps).to_have_count(len(levels))
        if 1 in levels:
            expect(steps.nth(0)).to_have_text("1. Which group: " + path["group"])
        conditions = page.locator("#rule-conditions li.condition")
        expect(conditions).to_have_count(len(path["conditions"]))
        for i, condition in enumerate(path["conditions"]):
            item = conditions.nth(i)
            assert item.get_attribute("data-concept") == str(condition["concept"])
            expect(item).to_contain_text(condition["text"])
            expect(item.locator("img.where")).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
            strip = item.locator("img:not(.where)")
            expect(strip).to_have_attribute("src", re.compile(r"^blob:"))
            page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=strip.element_handle())
            shown = strip.evaluate("i => [i.naturalWidth, i.naturalHeight]")
            assert shown == list(Image.open(io.BytesIO(rules.prototype_png(condition["concept"]))).size)
        trust = page.locator("#rule-trust")
        expect(trust).to_contain_text(f"agree with the network on {100 * rules.fidelity:.1f}% of its test images")
        if not path["agrees"]:
            expect(trust).to_contain_text(f"the rules say {path['label']}, the network {path['network_label']}")
        expect(page.locator("#rules-none")).to_be_hidden()

        # The same network without rules: the page says so and why, instead of a rule path.
        page.select_option("#model", "plain")
        again = tmp_path / "again.png"  # another file: picking the same one again is no change to the input
        again.write_bytes(animal_png.read_bytes())
        page.set_input_files("#file", str(again))
        expect(page.locator("#rules-none")).to_contain_text("No rule path: model plain version 1 has no rules")
        expect(page.locator("#rule-path")).to_be_hidden()
        expect(page.locator("#why-heading")).to_have_text(f"Why {label}?")
        watched.check(base)
