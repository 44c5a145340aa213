"""Presenters: one report per step, as Markdown for the UI and text for the CLI from the same
blocks; user text escaped in Markdown; an unreadable summary falls back to JSON."""

from pipelines.reports import Report, for_step


def test_markdown_and_text_come_from_the_same_blocks():
    r = Report().line("**3** rows <b>").table(["a", "b"], [["x|y", 1], ["long value", 22]])
    assert r.markdown() == (
        "**3** rows &lt;b&gt;\n\n| a | b |\n|---|---|\n| x\\|y | 1 |\n| long value | 22 |"
    )
    assert r.text() == "3 rows <b>\na           b\nx|y         1\nlong value  22"


def test_dataset_report_names_what_was_dropped_and_why():
    stats = {
        "rows_read": 10,
        "rows_kept": 8,
        "shape": "classification",
        "dropped": {"too_long": 2},
        "drop_examples": {"too_long": [{"where": "a.csv line 3", "detail": "3000 tokens"}]},
        "splits": {"train": 7, "validation": 1},
        "labels": {"billing": 5, "shipping": 3},
    }
    text = for_step("dataset", stats).text()
    assert "10 rows read · 8 kept · 2 dropped" in text
    assert "too long" in text and "a.csv line 3: 3000 tokens" in text
    assert "billing" in for_step("dataset", stats).markdown()


def test_a_summary_the_presenter_cannot_read_is_shown_as_json():
    assert '"odd": 1' in for_step("dataset", {"odd": 1}).text()
    assert '"x": 2' in for_step("no-such-step", {"x": 2}).markdown()
