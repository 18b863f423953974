// The real official `openai` Node client pointed at embedcar by base URL, exactly as an
// application would be, gets what it gets from the upstream directly.
//
// Both processes are real: `target/debug/fake-openai` and `target/debug/embedcar`,
// built by `scripts/test` before this runs (EMBEDCAR_BIN / FAKE_UPSTREAM_BIN override them).
// Run with `node --test` in tests/node after `npm ci`.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

import OpenAI from 'openai';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const EMBEDCAR_BIN = process.env.EMBEDCAR_BIN ?? path.join(ROOT, 'target/debug/embedcar');
const FAKE_BIN =
  process.env.FAKE_UPSTREAM_BIN ?? path.join(ROOT, 'target/debug/fake-openai');
const STARTUP_TIMEOUT_MS = 30_000;

const MODEL = 'text-embedding-3-small';
const INPUTS = ['The food was delicious and the waiter was friendly.', 'second input', 'ünïcødé ✓'];

// Every child still running when this process exits (a crash, a failed `before`) is killed.
const children = new Set();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});

/**
 * Starts `bin` and resolves with the match of `ready` against its stdout once a line matches.
 * Stdout is drained for the rest of the child's life so it never blocks on a full pipe; stdin
 * is a pipe, so the fake upstream exits by itself should this process die.
 */
function startProcess(bin, args, ready) {
  const child = spawn(bin, args, { stdio: ['pipe', 'pipe', 'inherit'] });
  children.add(child);
  const exited = new Promise((resolve) => child.once('exit', resolve));
  exited.then(() => children.delete(child));
  const matched = new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`${bin} printed no line matching ${ready} in ${STARTUP_TIMEOUT_MS} ms`)),
      STARTUP_TIMEOUT_MS,
    );
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`${bin} did not start: ${e.message}`));
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`${bin} exited (code ${code}, signal ${signal}) before it was ready`));
    });
    let found = false;
    createInterface({ input: child.stdout }).on('line', (line) => {
      if (found) return;
      // Plain text whether or not the log has colours.
      const m = line.replace(/\x1b\[[0-9;]*m/g, '').match(ready);
      if (m) {
        found = true;
        clearTimeout(timer);
        resolve(m);
      }
    });
  });
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    let timer;
    const timeout = new Promise((resolve) => {
      timer = setTimeout(resolve, 10_000, 'timeout');
    });
    const outcome = await Promise.race([exited, timeout]);
    clearTimeout(timer);
    if (outcome === 'timeout') {
      child.kill('SIGKILL');
      await exited;
    }
  };
  return { matched, stop };
}

function client(base, fetchImpl) {
  return new OpenAI({ baseURL: `${base}/v1`, apiKey: 'sk-test', maxRetries: 0, fetch: fetchImpl });
}

/** A fetch that records each embeddings request body and reply body as they went on the wire. */
function recordingFetch(log) {
  return async (url, init) => {
    const response = await fetch(url, init);
    if (String(url).endsWith('/embeddings')) {
      const reply = await response.clone().json();
      log.push({ request: JSON.parse(init.body), reply });
    }
    return response;
  };
}

function vectors(response) {
  return response.data.map((d) => d.embedding);
}

/** Everything the caller sees of an embeddings reply, bar the vectors' container type. */
function assertSameEmbeddings(got, want, what) {
  assert.equal(got.object, 'list', what);
  assert.equal(got.model, want.model, `${what}: model`);
  assert.deepEqual(got.usage, want.usage, `${what}: usage`);
  assert.deepEqual(
    got.data.map((d) => d.index),
    want.data.map((d) => d.index),
    `${what}: indexes`,
  );
  assert.deepEqual(vectors(got), vectors(want), `${what}: vectors`);
}

describe('the official openai Node client through embedcar', () => {
  let fake;
  let proxy;
  let direct;
  let proxied;
  const wire = [];

  before(async () => {
    fake = startProcess(FAKE_BIN, ['--port', '0'], /LISTENING (http:\/\/\S+)/);
    const fakeUrl = (await fake.matched)[1];
    proxy = startProcess(
      EMBEDCAR_BIN,
      ['--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', fakeUrl],
      /listening addr=(\S+) admin_addr=(\S+)/,
    );
    const proxyUrl = `http://${(await proxy.matched)[1]}`;
    direct = client(fakeUrl);
    proxied = client(proxyUrl, recordingFetch(wire));
  });

  after(async () => {
    await proxy?.stop();
    await fake?.stop();
  });

  test('default encoding: asked for in base64, decoded by the client, equal to direct', async () => {
    wire.length = 0;
    const want = await direct.embeddings.create({ model: MODEL, input: INPUTS });
    const got = await proxied.embeddings.create({ model: MODEL, input: INPUTS });
    assertSameEmbeddings(got, want, 'default encoding');
    assert.equal(got.data.length, 3);
    for (const v of vectors(got)) {
      assert.equal(v.length, 8);
      assert.ok(v.every((x) => typeof x === 'number' && Number.isFinite(x)));
    }
    // The client really took the base64 path: it asked for base64 and embedcar answered so.
    assert.equal(wire.length, 1);
    assert.equal(wire[0].request.encoding_format, 'base64');
    assert.ok(wire[0].reply.data.every((d) => typeof d.embedding === 'string'));
  });

  test("encoding_format 'float' is equal to direct, number for number", async () => {
    const want = await direct.embeddings.create({ model: MODEL, input: INPUTS, encoding_format: 'float' });
    const got = await proxied.embeddings.create({ model: MODEL, input: INPUTS, encoding_format: 'float' });
    assertSameEmbeddings(got, want, 'float');
    // Shortest float32 text: read back as float32, exactly the client's own decoding of the
    // base64 reply (JSON numbers parse as float64, so compare after rounding to float32).
    const decoded = await proxied.embeddings.create({ model: MODEL, input: INPUTS });
    assert.deepEqual(
      vectors(got).map((v) => v.map(Math.fround)),
      vectors(decoded),
    );
  });

  test("an explicit encoding_format 'base64' reaches the caller as the same strings", async () => {
    const want = await direct.embeddings.create({ model: MODEL, input: INPUTS, encoding_format: 'base64' });
    const got = await proxied.embeddings.create({ model: MODEL, input: INPUTS, encoding_format: 'base64' });
    assertSameEmbeddings(got, want, 'base64');
    assert.ok(vectors(got).every((v) => typeof v === 'string'));
  });

  test('dimensions, a single string and token-id inputs are equal to direct', async () => {
    const cases = [
      { input: 'hello', dimensions: 32 },
      { input: INPUTS, dimensions: 3 },
      { input: 'just one string' },
      { input: [1, 2, 3] },
      { input: [[1, 2, 3], [4, 5], [100276]] },
      { input: [[7, 8], [7, 8]] },
      { input: ['repeated', 'other', 'repeated'] },
    ];
    for (const c of cases) {
      for (const encoding of [undefined, 'float']) {
        const body = { model: MODEL, ...c, ...(encoding ? { encoding_format: encoding } : {}) };
        const what = JSON.stringify(body);
        const want = await direct.embeddings.create(body);
        const got = await proxied.embeddings.create(body);
        assertSameEmbeddings(got, want, what);
        if (c.dimensions) assert.ok(vectors(got).every((v) => v.length === c.dimensions), what);
      }
    }
  });

  test('50 concurrent callers each get what they would get directly', async () => {
    // Distinct inputs, a shared one and repeats, so callers batch, coalesce and hit the cache.
    const bodies = Array.from({ length: 50 }, (_, i) => ({
      model: MODEL,
      input: i % 5 === 0 ? ['shared by every fifth caller', `caller ${i}`] : `node caller ${i % 40}`,
      ...(i % 3 === 0 ? { encoding_format: 'float' } : {}),
    }));
    const want = await Promise.all(bodies.map((b) => direct.embeddings.create(b)));
    const got = await Promise.all(bodies.map((b) => proxied.embeddings.create(b)));
    assert.equal(got.length, 50);
    got.forEach((g, i) => assertSameEmbeddings(g, want[i], `caller ${i}`));
  });

  test('models.list() is equal to direct', async () => {
    const ids = async (c) => {
      const out = [];
      for await (const m of c.models.list()) out.push(m.id);
      return out;
    };
    const want = await ids(direct);
    const got = await ids(proxied);
    assert.deepEqual(got, want);
    assert.ok(got.includes(MODEL));
  });

  test('a streamed chat completion arrives chunk by chunk, equal to direct', async () => {
    const run = async (c) => {
      const stream = await c.chat.completions.create({
        model: 'gpt-4o-mini',
        messages: [{ role: 'user', content: 'hi' }],
        stream: true,
      });
      const chunks = [];
      for await (const chunk of stream) {
        if (chunk.choices.length) chunks.push(chunk.choices[0].delta.content);
      }
      return chunks;
    };
    const want = await run(direct);
    const got = await run(proxied);
    assert.deepEqual(got, want);
    assert.ok(got.length >= 2, `${got.length} chunks`);
  });

  test('an invalid request is the usual BadRequestError', async () => {
    await assert.rejects(proxied.embeddings.create({ model: MODEL, input: '' }), (e) => {
      assert.ok(e instanceof OpenAI.BadRequestError, `${e}`);
      assert.equal(e.status, 400);
      assert.equal(e.type, 'invalid_request_error');
      return true;
    });
  });
});
