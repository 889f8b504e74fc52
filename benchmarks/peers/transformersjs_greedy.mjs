// Greedy decoding of an ONNX export folder with transformers.js (Node, onnxruntime-node, CPU).
//
//   echo '{"folder": "/tmp/export", "prompt_ids": [[1,2,3]], "n": 16, "tjs_dtype": "fp32"}' |
//     TJS_NODE_PROJECT=/work/venvs/node node benchmarks/peers/transformersjs_greedy.mjs
//
// Request keys (JSON on stdin, the worker protocol of benchmarks/peers/edge_runtimes.py): folder, prompt_ids,
// texts (optional: also encode these with transformers.js' own tokenizer), n, tjs_dtype (fp32|fp16|q4|q4f16),
// min_new_tokens, warmup. Prints one JSON line: tokens, timings (prefill_s, decode_s, decode_tokens per
// prompt), prompt_ids, load_s, peak_rss_mb, info; or {"error": ...}.
// The folder is loaded untouched: env.localModelPath = its parent, the model id = its name, no remote files.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

function readStdin() {
    return new Promise((resolve, reject) => {
        let data = '';
        process.stdin.setEncoding('utf8');
        process.stdin.on('data', (chunk) => { data += chunk; });
        process.stdin.on('end', () => resolve(data));
        process.stdin.on('error', reject);
    });
}

async function loadTransformers() {
    // The package lives in the peers' node project, not beside this script: resolve it from there.
    const project = process.env.TJS_NODE_PROJECT || '/work/venvs/node';
    const require = createRequire(path.join(project, 'package.json'));
    const main = require.resolve('@huggingface/transformers'); // <pkg>/dist/transformers.node.cjs
    const entry = path.join(path.dirname(main), 'transformers.node.mjs');
    const mod = await import(pathToFileURL(entry).href);
    return { mod, version: mod.env.version };
}

const now = () => performance.now() / 1000;

async function main() {
    const req = JSON.parse(await readStdin());
    const { mod: T, version } = await loadTransformers();
    const { AutoModelForCausalLM, AutoTokenizer, Tensor, env } = T;
    const folder = path.resolve(req.folder);
    env.allowRemoteModels = false;
    env.allowLocalModels = true;
    env.localModelPath = path.dirname(folder) + path.sep;
    const modelId = path.basename(folder);

    const t0 = now();
    const model = await AutoModelForCausalLM.from_pretrained(modelId, {
        local_files_only: true,
        dtype: req.tjs_dtype || 'fp32',
        device: 'cpu',
    });
    const loadS = now() - t0;

    let promptIds = null;
    if (req.texts) {
        const tokenizer = await AutoTokenizer.from_pretrained(modelId, { local_files_only: true });
        promptIds = req.texts.map((t) => Array.from(tokenizer.encode(t, { add_special_tokens: false })).map(Number));
    }

    async function generate(ids, n, minNew) {
        const marks = [];
        let start = 0;
        let sawPrompt = false;
        const streamer = {
            put() {
                if (!sawPrompt) { sawPrompt = true; return; } // generate() hands over the prompt first
                marks.push(now());
            },
            end() {},
        };
        const inputIds = new Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
        const attentionMask = new Tensor('int64', new BigInt64Array(ids.length).fill(1n), [1, ids.length]);
        const options = {
            input_ids: inputIds,
            attention_mask: attentionMask,
            max_new_tokens: n,
            do_sample: false,
            repetition_penalty: 1.0,
            streamer,
        };
        if (minNew) options.min_new_tokens = minNew;
        start = now();
        const out = await model.generate(options);
        const seq = out.tolist()[0].map(Number);
        const timing = marks.length
            ? { prefill_s: marks[0] - start, decode_s: marks.at(-1) - marks[0], decode_tokens: marks.length - 1 }
            : { prefill_s: 0, decode_s: 0, decode_tokens: 0 };
        return [seq.slice(ids.length), timing];
    }

    if (req.warmup) await generate(req.prompt_ids[0], req.warmup, req.warmup);
    const tokens = [];
    const timings = [];
    for (const ids of req.prompt_ids) {
        const [out, timing] = await generate(ids, req.n, req.min_new_tokens || 0);
        tokens.push(out);
        timings.push(timing);
    }
    // VmHWM, not resourceUsage().maxRSS: Linux carries maxRSS across execve from the (big) parent.
    let peakRssMb = process.resourceUsage().maxRSS / 1024;
    try {
        const m = /VmHWM:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'));
        if (m) peakRssMb = Number(m[1]) / 1024;
    } catch { /* not Linux */ }
    console.log(JSON.stringify({
        tokens, timings, prompt_ids: promptIds, load_s: loadS, peak_rss_mb: peakRssMb,
        info: { transformers_js: version, node: process.version },
    }));
    if (typeof model.dispose === 'function') await model.dispose();
}

main().catch((error) => {
    console.error(error && error.stack ? error.stack : String(error));
    console.log(JSON.stringify({ error: `${error && error.name ? error.name : 'Error'}: ${error && error.message ? error.message : String(error)}` }));
    process.exitCode = 0;
});
