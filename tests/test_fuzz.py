"""Generated bad input (hypothesis): broken uploads always get a clear message (StepError) and
never a traceback; any request body to the runtime gets a 2xx or a 4xx, never a 5xx."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipelines import dataset
from pipelines.base import StepError
from studio import runtime

TEXT = st.text(st.characters(codec="utf-8"), max_size=300)
CELL = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), TEXT)
ROWS = st.lists(
    st.dictionaries(st.sampled_from(["text", "label", "messages", "x"]), CELL), max_size=8
)


@st.composite
def upload(draw):
    """A file a user might upload: random bytes, broken text, or JSON of the wrong shape."""
    ext = draw(st.sampled_from(["csv", "tsv", "json", "jsonl", "txt", "parquet"]))
    kind = draw(st.sampled_from(["bytes", "text", "rows"]))
    if kind == "bytes":
        content = draw(st.binary(max_size=400))
    elif kind == "text":
        content = draw(TEXT).encode("utf-8", "surrogatepass")
    else:
        rows = draw(ROWS)
        lines = [json.dumps(r) for r in rows]
        content = ("\n".join(lines) if ext == "jsonl" else json.dumps(rows)).encode()
    return ext, content


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upload())
def test_bad_uploads_get_a_clear_message(tiny_tokenizer_dir, file):
    ext, content = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload.{ext}"
        path.write_bytes(content)
        config = dataset.DatasetConfig(
            name="fuzz", files=[str(path)], tokenizer_model=str(tiny_tokenizer_dir)
        )
        try:
            dataset.run(config, Path(tmp) / "out", lambda _: None)
            event("imported")
        except StepError as e:
            assert str(e).strip()  # a message, not a traceback
            event("refused with a message")


@pytest.fixture(scope="module")
def client(tiny_onnx):
    from fastapi.testclient import TestClient

    model = runtime.ServedModel("tiny", tiny_onnx)
    with TestClient(runtime.build_app({"tiny": model})) as test_client:
        yield test_client
    model.close()


VALUE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 5000),
        st.floats(allow_nan=False),
        st.text(max_size=20),
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "", 1]), "content": VALUE}
)
FIELDS = {
    "messages": st.one_of(VALUE, st.lists(MESSAGE, max_size=3)),
    "max_tokens": st.one_of(st.integers(-3, 40), VALUE),
    "temperature": st.one_of(st.floats(-1, 3), VALUE),
    "top_p": st.one_of(st.floats(-1, 2), VALUE),
    "stop": st.one_of(st.lists(st.text(max_size=4), max_size=5), VALUE),
    "seed": VALUE,
    "stream": st.one_of(st.booleans(), VALUE),
    "n": st.one_of(st.integers(0, 3), VALUE),
}
VALID = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
BODY = st.one_of(
    VALUE,
    st.fixed_dictionaries(
        {"model": st.sampled_from(["tiny", "other", "", None, 3])}, optional=FIELDS
    ),
    # a valid request with one or two fields changed: answers and 4xx both come up
    st.fixed_dictionaries({}, optional=FIELDS).map(
        lambda extra: {**VALID, **dict(list(extra.items())[:2])}
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(BODY)
def test_any_request_body_gets_an_answer_or_a_4xx(client, body):
    response = client.post("/v1/chat/completions", content=json.dumps(body))
    assert response.status_code < 500, (body, response.text)
    event(f"status {response.status_code}")
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
