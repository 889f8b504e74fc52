// Chat with an ONNX export folder in the browser: transformers.js + onnxruntime-web, every file from this
// server (serve.py), never from a CDN or the Hub.
//
// URL parameters (all optional): model=NAME (a folder under /models/), dtype=fp32|fp16|q8|int8|uint8|q4|q4f16,
// device=auto|webgpu|wasm, max_new_tokens=N, sample=1, prompt=TEXT (with autorun=1: load and send it).
// For tests and scripts the page exposes window.__state ('idle', 'loading', 'ready', 'generating', 'done',
// 'error'), window.__error, window.__autoDevice (what device=auto picks in this browser), window.__device
// and window.__dtype (what was loaded), and after a reply window.__promptIds,
// window.__tokens (the reply's token ids, from generate's output), window.__streamedTokens (the ids the
// streamer saw), window.__reply (the text) and window.__chunks (how many pieces were streamed).
import { AutoModelForCausalLM, AutoTokenizer, TextStreamer, env } from './transformers/transformers.min.js';

env.allowRemoteModels = false;   // never the Hub
env.allowLocalModels = true;     // off by default in browsers
env.localModelPath = '/models/';  // serve.py mounts each export folder at /models/NAME/
env.useBrowserCache = false;     // the files are local already; a cached copy would hide a re-export
env.backends.onnx.wasm.wasmPaths = new URL('ort/', location.href).href;  // not the jsDelivr default

// transformers.js dtype -> the file it loads from onnx/ (its own naming).
const DTYPE_FILES = {
    fp32: 'model.onnx', fp16: 'model_fp16.onnx', q8: 'model_quantized.onnx', int8: 'model_int8.onnx',
    uint8: 'model_uint8.onnx', q4: 'model_q4.onnx', q4f16: 'model_q4f16.onnx',
};
// What to pick when the URL names no dtype: transformers.js' own habits first (q4f16 is the usual WebGPU
// choice, q8 its wasm default; int4 decodes slowly on wasm, see README.md), then by size.
const PREFERENCE = {
    webgpu: ['q4f16', 'fp16', 'q4', 'fp32', 'q8', 'int8', 'uint8'],
    wasm: ['q8', 'int8', 'uint8', 'q4', 'fp32', 'q4f16', 'fp16'],
};

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let tokenizer = null;
let model = null;
let messages = [];
let manifest = null;  // serve.py's /models.json: {NAME: [onnx files]}

function setState(state, text, isError = false) {
    window.__state = state;
    if (text !== undefined) {
        $('status').textContent = text;
        $('status').classList.toggle('error', isError);
    }
}

function fail(error) {
    console.error(error);
    window.__error = String(error && error.message ? error.message : error);
    setState('error', `error: ${window.__error}`, true);
    $('load').disabled = false;
}

async function exists(url) {
    try {
        return (await fetch(url, { method: 'HEAD' })).ok;
    } catch {
        return false;
    }
}

// WebGPU when the browser has it and gives an adapter (headless or GPU-less browsers may expose
// navigator.gpu but no adapter), else the CPU through WebAssembly.
async function pickDevice(choice) {
    if (choice === 'wasm') return 'wasm';
    const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
    if (adapter) return 'webgpu';
    if (choice === 'webgpu') throw new Error('WebGPU is not available in this browser (no navigator.gpu adapter); choose wasm');
    return 'wasm';
}

// Fill the dtype list with the graphs this folder has (from serve.py's /models.json, else by asking for each
// file); keep the current choice, or take the URL's, or the first of PREFERENCE that is there.
async function refreshDtypes() {
    const name = $('model').value.trim();
    const select = $('dtype');
    const wanted = select.value || params.get('dtype');
    select.replaceChildren();
    if (!name) return;
    const base = `${env.localModelPath}${encodeURIComponent(name)}/onnx/`;
    const files = manifest?.[name]
        ?? (await Promise.all(Object.values(DTYPE_FILES).map(async (f) => ((await exists(base + f)) ? f : null))));
    const available = Object.keys(DTYPE_FILES).filter((d) => files.includes(DTYPE_FILES[d]));
    for (const dtype of Object.keys(DTYPE_FILES)) {
        const option = new Option(available.includes(dtype) ? dtype : `${dtype} (not in folder)`, dtype);
        option.disabled = !available.includes(dtype);
        select.add(option);
    }
    const device = await pickDevice($('device').value).catch(() => 'wasm');
    select.value = wanted && available.includes(wanted) ? wanted
        : PREFERENCE[device].find((d) => available.includes(d)) ?? '';
    if (!available.length) setState('idle', `no onnx/model*.onnx under ${base}`, true);
}

async function loadModel() {
    const name = $('model').value.trim();
    const dtype = $('dtype').value;
    if (!name || !dtype) return fail(new Error('choose a model folder and a dtype'));
    $('load').disabled = true;
    setState('loading', `loading ${name} (${dtype}) ...`);
    try {
        const device = await pickDevice($('device').value);
        window.__device = device;
        window.__dtype = dtype;
        const started = performance.now();
        const progress = (p) => {
            if (p.status === 'progress' && p.total) {
                setState('loading', `loading ${p.file}: ${(p.loaded / 2 ** 20).toFixed(0)} / ${(p.total / 2 ** 20).toFixed(0)} MiB`);
            }
        };
        await model?.dispose?.();
        tokenizer = await AutoTokenizer.from_pretrained(name);
        model = await AutoModelForCausalLM.from_pretrained(name, { dtype, device, progress_callback: progress });
        messages = [];
        $('log').replaceChildren();
        for (const id of ['prompt', 'go', 'reset']) $(id).disabled = false;
        const seconds = ((performance.now() - started) / 1000).toFixed(1);
        const threads = device === 'wasm' ? `, ${env.backends.onnx.wasm.numThreads} thread(s)` : '';
        setState('ready', `${name} ${dtype} on ${device}${threads}, loaded in ${seconds} s`);
    } catch (error) {
        fail(error);
    } finally {
        $('load').disabled = false;
    }
}

function bubble(role, text) {
    const div = document.createElement('div');
    div.className = `msg ${role}`;
    div.textContent = text;
    $('log').append(div);
    return div;
}

async function send(text) {
    if (!model || !text.trim()) return;
    for (const id of ['prompt', 'go', 'reset', 'load']) $(id).disabled = true;
    setState('generating', 'generating ...');
    messages.push({ role: 'user', content: text });
    bubble('user', text);
    const out = bubble('assistant', '');
    const streamed = [];
    let chunks = 0;
    let firstAt = 0;
    try {
        // The whole conversation goes through the chat template each turn (no cache kept between turns).
        const inputs = tokenizer.apply_chat_template(messages, { add_generation_prompt: true, return_dict: true });
        const promptIds = inputs.input_ids.tolist()[0].map(Number);
        const streamer = new TextStreamer(tokenizer, {
            skip_prompt: true,
            skip_special_tokens: true,
            callback_function: (piece) => {
                if (piece) chunks += 1;
                out.textContent += piece;
            },
            token_callback_function: (ids) => {
                if (!firstAt) firstAt = performance.now();
                streamed.push(...ids.map(Number));
            },
        });
        const sample = $('sample').checked;
        const maxNew = Math.max(1, parseInt($('max_new_tokens').value, 10) || 256);
        const started = performance.now();
        // Greedy unless asked: do_sample and repetition_penalty set here, because a checkpoint's
        // generation_config.json (Qwen's sets sampling and a 1.1 penalty) would otherwise apply.
        const options = sample ? {} : { do_sample: false, repetition_penalty: 1.0 };
        const sequences = await model.generate({ ...inputs, max_new_tokens: maxNew, streamer, ...options });
        const done = performance.now();
        const tokens = sequences.tolist()[0].map(Number).slice(promptIds.length);
        const reply = tokenizer.decode(tokens, { skip_special_tokens: true });
        messages.push({ role: 'assistant', content: reply });
        const decodeRate = tokens.length > 1 ? ((tokens.length - 1) / ((done - firstAt) / 1000)).toFixed(1) : '-';
        const meta = document.createElement('div');
        meta.className = 'meta';
        meta.textContent = `${tokens.length} tokens; prompt ${promptIds.length} tokens in `
            + `${((firstAt - started) / 1000).toFixed(2)} s; decode ${decodeRate} tok/s`;
        out.append(meta);
        Object.assign(window, {
            __promptIds: promptIds, __tokens: tokens, __streamedTokens: streamed, __reply: reply, __chunks: chunks,
        });
        setState('done', `${$('model').value} ${window.__dtype} on ${window.__device}`
            + (window.__device === 'wasm' ? `, ${env.backends.onnx.wasm.numThreads} thread(s)` : '') + ': ready');
    } catch (error) {
        fail(error);
    } finally {
        for (const id of ['prompt', 'go', 'reset', 'load']) $(id).disabled = false;
        $('prompt').focus();
    }
}

async function init() {
    setState('idle');
    window.__autoDevice = await pickDevice('auto');
    $('device').options[0].text = window.__autoDevice === 'webgpu' ? 'auto (WebGPU here)' : 'auto (wasm here: no WebGPU adapter)';
    for (const key of ['device', 'max_new_tokens']) if (params.has(key)) $(key).value = params.get(key);
    $('sample').checked = params.get('sample') === '1';
    try {
        manifest = await (await fetch('/models.json')).json();
    } catch {
        manifest = null;  // another static server: no list, type the folder's name
    }
    const names = Object.keys(manifest ?? {});
    for (const n of names) $('models').append(new Option(n));
    $('model').value = params.get('model') ?? names[0] ?? '';
    await refreshDtypes();
    $('model').addEventListener('change', refreshDtypes);
    $('device').addEventListener('change', refreshDtypes);
    $('load').addEventListener('click', loadModel);
    $('reset').addEventListener('click', () => { messages = []; $('log').replaceChildren(); });
    $('send').addEventListener('submit', (e) => {
        e.preventDefault();
        const text = $('prompt').value;
        $('prompt').value = '';
        send(text);
    });
    $('prompt').addEventListener('keydown', (e) => {
        if (e.key === 'Enter' && !e.shiftKey) {
            e.preventDefault();
            $('send').requestSubmit();
        }
    });
    if (params.get('autorun') === '1') {
        await loadModel();
        if (window.__state === 'ready' && params.get('prompt')) await send(params.get('prompt'));
    }
}

init().catch(fail);
