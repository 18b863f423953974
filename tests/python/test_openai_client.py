"""The real official `openai` Python client pointed at embedcar by base URL, exactly as an
application would be, gets what it gets from the upstream directly."""

import asyncio

import openai
import pytest

MODEL = "text-embedding-3-small"
INPUTS = ["The food was delicious and the waiter was friendly.", "second input", "ünïcødé ✓"]


def clients(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)


@pytest.fixture
def direct(fake_upstream):
    return clients(fake_upstream)


@pytest.fixture
def proxied(embedcar):
    return clients(embedcar)


def vectors(response):
    return [d.embedding for d in response.data]


@pytest.mark.parametrize("encoding", [openai.NOT_GIVEN, "float", "base64"])
def test_embeddings_equal_the_upstreams(direct, proxied, encoding):
    want = direct.embeddings.create(model=MODEL, input=INPUTS, encoding_format=encoding)
    got = proxied.embeddings.create(model=MODEL, input=INPUTS, encoding_format=encoding)
    assert got.model == want.model
    assert [d.index for d in got.data] == [0, 1, 2]
    assert got.usage == want.usage
    if encoding == "base64":
        # Asked for explicitly, the client hands back the base64 string untouched.
        assert [d.embedding for d in got.data] == [d.embedding for d in want.data]
    else:
        assert vectors(got) == vectors(want)
        assert all(len(v) == 8 for v in vectors(got))


def test_embeddings_with_dimensions_and_token_ids(direct, proxied):
    for kwargs in ({"input": "hello", "dimensions": 32}, {"input": [[1, 2, 3], [4, 5]]}):
        want = direct.embeddings.create(model=MODEL, **kwargs)
        got = proxied.embeddings.create(model=MODEL, **kwargs)
        assert vectors(got) == vectors(want)


def test_models_list_equals_the_upstreams(direct, proxied):
    assert [m.id for m in proxied.models.list()] == [m.id for m in direct.models.list()]


def test_a_streamed_chat_completion_arrives_chunk_by_chunk(direct, proxied):
    def run(client):
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        return [c.choices[0].delta.content for c in stream if c.choices]

    want, got = run(direct), run(proxied)
    assert got == want
    assert len(got) >= 2


def test_upstream_errors_reach_the_client_as_the_usual_exceptions(proxied):
    with pytest.raises(openai.BadRequestError) as err:
        proxied.embeddings.create(model=MODEL, input="")
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error"


def test_the_async_client_gets_the_same_answers(fake_upstream, embedcar):
    async def run():
        direct = openai.AsyncOpenAI(base_url=f"{fake_upstream}/v1", api_key="sk-test")
        proxied = openai.AsyncOpenAI(base_url=f"{embedcar}/v1", api_key="sk-test")
        async with direct, proxied:
            # Twenty concurrent callers through one embedcar, each compared with the direct answer.
            inputs = [f"async caller {i}" for i in range(20)]
            want = await asyncio.gather(
                *(direct.embeddings.create(model=MODEL, input=t) for t in inputs))
            got = await asyncio.gather(
                *(proxied.embeddings.create(model=MODEL, input=t) for t in inputs))
            assert [vectors(r) for r in got] == [vectors(r) for r in want]
            got_f = await proxied.embeddings.create(model=MODEL, input=inputs, encoding_format="float")
            want_f = await direct.embeddings.create(model=MODEL, input=inputs, encoding_format="float")
            assert vectors(got_f) == vectors(want_f)
            models = [m.id async for m in proxied.models.list()]
            assert "text-embedding-3-small" in models
            stream = await proxied.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
            chunks = [c.choices[0].delta.content async for c in stream if c.choices]
            assert len(chunks) >= 2

    asyncio.run(run())
