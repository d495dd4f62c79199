//! Constrained decoding on the default model: output under a JSON schema always parses and
//! validates (checked by an independent validator), a constrained request in a mixed batch
//! gets what it gets alone, and grammars that cannot be used are refused by name.

mod common;

use candle_core::Device;
use hearth_engine::{Engine, EngineConfig, EngineError, Event, GenerateRequest, Grammar, Precision, SamplingParams};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};

fn smollm2_engine() -> Option<Engine> {
    let path = common::smollm2()?;
    let loaded = hearth_engine::load(&path, Precision::Native, &Device::Cpu).expect("smollm2 loads");
    Some(Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default()))
}

fn chat_prompt(engine: &Engine, user: &str) -> Vec<u32> {
    let text = format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n");
    engine.tokenizer().encode(&text, false).expect("encodes")
}

fn request(prompt: Vec<u32>, grammar: Option<Grammar>, params: SamplingParams, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        max_tokens,
        params,
        stop: vec![],
        ignore_eos: false,
        prompt_logprobs: false,
        adapter: None,
        grammar,
        cache_salt: None,
    }
}

/// The text and tokens of one request, and why it ended.
async fn run(engine: &Engine, req: GenerateRequest) -> (String, Vec<u32>, hearth_engine::FinishReason) {
    let mut rx = engine.generate(req).expect("queued");
    let (mut text, mut tokens) = (String::new(), Vec::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { sampled, text: t } => {
                tokens.push(sampled.token);
                text.push_str(&t);
            }
            Event::Finished { reason, text: t, .. } => {
                text.push_str(&t);
                return (text, tokens, reason);
            }
            Event::Error(e) => panic!("{e}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    panic!("the request ended without finishing")
}

/// A random schema of the kinds applications send: objects of typed, bounded properties,
/// enums, arrays and nested objects, some required.
fn random_schema(rng: &mut StdRng, depth: usize) -> Value {
    let n = rng.gen_range(1..=4);
    let mut props = serde_json::Map::new();
    let mut required = Vec::new();
    for i in 0..n {
        let name = format!("{}_{i}", ["name", "age", "city", "score", "tags", "ok", "item"][rng.gen_range(0..7)]);
        let kind = rng.gen_range(0..if depth < 1 { 7 } else { 6 });
        let schema = match kind {
            0 => json!({"type": "string", "maxLength": rng.gen_range(1..12)}),
            1 => {
                let lo = rng.gen_range(-50..50);
                json!({"type": "integer", "minimum": lo, "maximum": lo + rng.gen_range(0..100)})
            }
            2 => json!({"type": "number", "minimum": 0, "maximum": 1000}),
            3 => json!({"type": "boolean"}),
            4 => {
                let all = [json!("red"), json!("green"), json!("blue"), json!(7), Value::Null];
                json!({"enum": all[..rng.gen_range(1..=5)]})
            }
            5 => json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                        "minItems": rng.gen_range(0..2), "maxItems": rng.gen_range(2..5)}),
            _ => random_schema(rng, depth + 1),
        };
        if rng.gen_bool(0.6) {
            required.push(Value::String(name.clone()));
        }
        props.insert(name, schema);
    }
    json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

#[tokio::test]
async fn output_under_fifty_generated_schemas_always_validates() {
    let Some(engine) = smollm2_engine() else { return };
    let mut rng = StdRng::seed_from_u64(7);
    let schemas: Vec<Value> = (0..50).map(|_| random_schema(&mut rng, 0)).collect();
    // All fifty in flight together: constrained sequences share steps like any others.
    let tasks: Vec<_> = schemas
        .iter()
        .enumerate()
        .map(|(i, schema)| {
            let engine = engine.clone();
            let schema = schema.clone();
            tokio::spawn(async move {
                let prompt = chat_prompt(&engine, &format!("Describe a person as JSON matching: {schema}"));
                let params = SamplingParams { temperature: 0.8, seed: Some(i as u64), ..Default::default() };
                run(&engine, request(prompt, Some(Grammar::JsonSchema(schema)), params, 200)).await
            })
        })
        .collect();
    for (schema, task) in schemas.iter().zip(tasks) {
        let (text, _, reason) = task.await.expect("task");
        assert_eq!(reason, hearth_engine::FinishReason::Stop, "ran out of tokens: {text}");
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?} for {schema}"));
        let validator = jsonschema::validator_for(schema).expect("a valid schema");
        let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{text} against {schema}: {errors:?}");
    }
}

#[tokio::test]
async fn json_object_mode_gives_an_object_and_a_constrained_request_batches_like_it_runs_alone() {
    let Some(engine) = smollm2_engine() else { return };
    for name in ["smol_attn", "smol_all"] {
        engine.load_adapter(name, &common::fixtures().join("lora").join(name), None).expect("adapter");
    }
    let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
    let schema = json!({"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
        "required": ["capital"], "additionalProperties": false});
    let cases: Vec<(Option<&str>, Option<Grammar>)> = vec![
        (None, Some(Grammar::JsonObject)),
        (None, Some(Grammar::JsonSchema(schema.clone()))),
        (None, None),
        (Some("smol_attn"), Some(Grammar::JsonSchema(schema.clone()))),
        (Some("smol_all"), Some(Grammar::JsonObject)),
        (Some("smol_all"), None),
    ];
    let make = |adapter: Option<&str>, grammar: Option<Grammar>| {
        let prompt = chat_prompt(&engine, "What is the capital of France? Answer in JSON.");
        GenerateRequest {
            adapter: adapter.map(|a| engine.adapter(a).expect("loaded")),
            ..request(prompt, grammar, greedy.clone(), 40)
        }
    };
    let mut alone = Vec::new();
    for (adapter, grammar) in &cases {
        alone.push(run(&engine, make(*adapter, grammar.clone())).await);
    }
    for ((_, grammar), (text, _, _)) in cases.iter().zip(&alone) {
        if grammar.is_some() {
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
            assert!(v.is_object(), "{text}");
        }
    }
    // The same six at once, twice over, in one batch.
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let (adapter, grammar) = cases[i % cases.len()].clone();
            let engine = engine.clone();
            let req = make(adapter, grammar);
            tokio::spawn(async move { run(&engine, req).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.expect("task");
        assert_eq!(got.1, alone[i % cases.len()].1, "case {i} ({:?}) differs in a batch", cases[i % cases.len()]);
    }
}

#[tokio::test]
async fn a_gbnf_grammar_shapes_the_output() {
    let Some(engine) = smollm2_engine() else { return };
    let gbnf = r#"
# a verdict, then a number of stars
root  ::= "Verdict: " ("yes" | "no") ", stars: " [1-5] "\n"
"#;
    for seed in 0..6 {
        let prompt = chat_prompt(&engine, "Is Paris the capital of France? Rate your confidence.");
        let params = SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() };
        let (text, _, reason) = run(&engine, request(prompt, Some(Grammar::Gbnf(gbnf.into())), params, 30)).await;
        assert_eq!(reason, hearth_engine::FinishReason::Stop, "{text:?}");
        let rest = text.strip_prefix("Verdict: ").unwrap_or_else(|| panic!("{text:?}"));
        let (verdict, stars) = rest.split_once(", stars: ").unwrap_or_else(|| panic!("{text:?}"));
        assert!(["yes", "no"].contains(&verdict), "{text:?}");
        assert!(
            stars.len() == 2 && stars.ends_with('\n') && ('1'..='5').contains(&stars.chars().next().unwrap()),
            "{text:?}"
        );
    }
}

#[tokio::test]
async fn grammars_that_cannot_be_used_are_refused_with_the_reason() {
    let Some(engine) = smollm2_engine() else { return };
    let prompt = chat_prompt(&engine, "hi");
    let refuse = |grammar: Grammar| match engine.generate(request(
        prompt.clone(),
        Some(grammar),
        SamplingParams::default(),
        8,
    )) {
        Err(EngineError::InvalidRequest(m)) => m,
        Err(e) => panic!("refused as {e:?}"),
        Ok(_) => panic!("accepted"),
    };
    let m = refuse(Grammar::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "strnig"}}})));
    assert!(m.contains("strnig"), "{m}");
    let m = refuse(Grammar::JsonSchema(json!({"type": "string", "format": "no-such-format"})));
    assert!(m.contains("no-such-format") || m.contains("format"), "{m}");
    let m = refuse(Grammar::JsonSchema(json!(["not", "a", "schema"])));
    assert!(m.contains("schema"), "{m}");
    let m = refuse(Grammar::Lark("start: undefined_rule".into()));
    assert!(m.contains("undefined_rule"), "{m}");
    let m = refuse(Grammar::Gbnf("root ::= answer\n".into()));
    assert!(m.contains("line 1: rule \"answer\" is used but never defined"), "{m}");
}
