//! Debugging aid: teacher-forces llama.cpp's greedy continuations (../shared/vectors/<file>.json) through our
//! engine and prints, per step, the largest difference between our log-probabilities and llama.cpp's for
//! its top-10 candidates. `cargo run --example parity_probe -- MODEL.gguf VECTORS.json [f32]`.
use cyber_inference::engine::model::{Batch, Context, ContextParams, KvType, Model, ModelParams};
use cyber_inference::engine::sampling::log_softmax;
use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = Model::load(Path::new(&args[1]), &ModelParams::default()).expect("model");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&args[2]).unwrap()).unwrap();
    let kv_type = if args.get(3).is_some_and(|a| a == "f32") {
        KvType::F32
    } else {
        KvType::F16
    };
    let context = |kv_type| {
        let params = ContextParams {
            n_ctx: 256,
            n_seq_max: 1,
            n_batch: 256,
            n_threads: 2,
            embeddings: false,
            type_k: kv_type,
            type_v: kv_type,
        };
        Context::new(model.clone(), params).unwrap()
    };
    let mut ctx = context(kv_type);
    if let Ok(ids) = std::env::var("PROBE_IDS") {
        let ids: Vec<u32> = ids.split(',').map(|t| t.parse().unwrap()).collect();
        ctx.decode(&Batch::single(&ids, 0, 0)).unwrap();
        return;
    }
    if std::env::var("PROBE_SELF").is_ok() {
        let mut c32 = context(KvType::F32);
        for case in v["greedy"].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let mut ids =
                model
                    .tokenizer()
                    .encode(prompt, case["add_special"].as_bool().unwrap(), true);
            ids.extend(
                case["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .take(15)
                    .map(|x| x.as_u64().unwrap() as u32),
            );
            ctx.seq_clear(0);
            c32.seq_clear(0);
            let mut line = String::new();
            for (i, &t) in ids.iter().enumerate() {
                ctx.decode(&Batch::single(&[t], i as u32, 0)).unwrap();
                c32.decode(&Batch::single(&[t], i as u32, 0)).unwrap();
                let a = log_softmax(ctx.logits(0));
                let b = log_softmax(c32.logits(0));
                let mut idx: Vec<usize> = (0..a.len()).collect();
                idx.sort_by(|&x, &y| a[y].total_cmp(&a[x]));
                let d = idx[..10]
                    .iter()
                    .map(|&j| (a[j] - b[j]).abs())
                    .fold(0f32, f32::max);
                line += &format!(" {d:.3}");
            }
            println!("{prompt:?} f16 vs f32 cache, top-10 max |dlogprob| per position:{line}");
        }
        return;
    }
    let mut worst_all = 0f32;
    for case in v["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids = model
            .tokenizer()
            .encode(prompt, case["add_special"].as_bool().unwrap(), true);
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let top = case["top_logprobs_first16"].as_array().unwrap();
        ctx.seq_clear(0);
        ctx.decode(&Batch::single(&ids, 0, 0)).unwrap();
        let mut line = String::new();
        let mut worst = 0f32;
        for (s, step) in top.iter().enumerate() {
            let lp = log_softmax(ctx.logits(0));
            let mut d = 0f32;
            for c in step.as_array().unwrap() {
                let id = c["id"].as_u64().unwrap() as usize;
                let r = c["logprob"].as_f64().unwrap() as f32;
                d = d.max((lp[id] - r).abs());
            }
            worst = worst.max(d);
            line += &format!(" {d:.3}");
            if s + 1 >= want.len() {
                break;
            }
            ctx.decode(&Batch::single(&want[s..s + 1], (ids.len() + s) as u32, 0))
                .unwrap();
        }
        worst_all = worst_all.max(worst);
        println!(
            "{prompt:?} ({} prompt tokens) worst {worst:.4}:{line}",
            ids.len()
        );
    }
    println!("worst over all cases: {worst_all:.4}");
}
