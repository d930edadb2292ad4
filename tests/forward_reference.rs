//! The forward pass against transformers' own outputs (`reference_forward.json`, transformers 5.24, f32).

mod common;

use bake::model::{Batch, ModelFiles, Request};
use bake::scoring::logprobs::mean_next_token_nll;
use candle_core::{Device, Tensor};
use common::max_abs_diff;
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
#[cfg_attr(not(all(fixture_shared, fixture_smollm2)), ignore = "needs BAKE_SHARED and BAKE_SMOLLM2 (see tests/common)")]
fn forward_matches_transformers_on_every_reference_model() {
    for (name, dir, reference) in common::reference_models() {
        let reference: Value = serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
        let files = ModelFiles::open(dir.to_str().unwrap()).unwrap();
        let tokenizer = files.tokenizer().unwrap();
        let model = files.load(&Device::Cpu).unwrap();
        for (case_index, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
            let label = format!("{name} case {case_index}");
            let expected_ids = ids(&case["input_ids"]);
            let got_ids = tokenizer.encode(case["prompt"].as_str().unwrap()).unwrap();
            assert_eq!(got_ids, expected_ids, "{label}: token ids");

            let batch = Batch::right_padded(std::slice::from_ref(&got_ids), 0, &Device::Cpu).unwrap();
            let last = batch.last_tokens();
            let out = model
                .forward(&batch, &Request { capture_at: Some(&last), logits: true, ..Default::default() })
                .unwrap();
            let logits = out.logits.unwrap().squeeze(0).unwrap();
            let last_logits: Vec<f32> = logits.get(got_ids.len() - 1).unwrap().to_vec1().unwrap();

            let top_ids = ids(&case["last_logits_top20"]["ids"]);
            let top_values = floats(&case["last_logits_top20"]["values"]);
            let ours: Vec<f32> = top_ids.iter().map(|&i| last_logits[i as usize]).collect();
            let diff = max_abs_diff(&ours, &top_values);
            assert!(diff <= 2e-3, "{label}: top-20 logits differ by {diff}");
            let argmax = last_logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            assert_eq!(argmax as u32, top_ids[0], "{label}: top-1");

            let nll = mean_next_token_nll(&logits, &got_ids).unwrap();
            let expected_nll = case["mean_nll"].as_f64().unwrap();
            assert!((nll - expected_nll).abs() <= 1e-3, "{label}: mean NLL {nll} vs {expected_nll}");

            let mut worst_o_proj = 0f32;
            for (layer, values) in case["o_proj_input_last_token"].as_object().unwrap() {
                let layer: usize = layer.parse().unwrap();
                let ours: Vec<f32> = out.captured[layer].get(0).unwrap().to_vec1().unwrap();
                let diff = max_abs_diff(&ours, &floats(values));
                assert!(diff <= 1e-3, "{label}: o_proj input of layer {layer} differs by {diff}");
                worst_o_proj = worst_o_proj.max(diff);
            }
            eprintln!("{label}: logits within {diff:.2e}, o_proj inputs within {worst_o_proj:.2e}, nll {nll:.5} vs {expected_nll:.5}");
        }
    }
}

#[test]
#[cfg_attr(not(all(fixture_shared, fixture_smollm2)), ignore = "needs BAKE_SHARED and BAKE_SMOLLM2 (see tests/common)")]
fn padded_batch_equals_one_prompt_at_a_time() {
    for (name, dir, reference) in common::reference_models() {
        let reference: Value = serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
        let model = ModelFiles::open(dir.to_str().unwrap()).unwrap().load(&Device::Cpu).unwrap();
        let prompts: Vec<Vec<u32>> =
            reference["cases"].as_array().unwrap().iter().map(|c| ids(&c["input_ids"])).collect();
        let batch = Batch::right_padded(&prompts, 0, &Device::Cpu).unwrap();
        let last = batch.last_tokens();
        let together =
            model.forward(&batch, &Request { capture_at: Some(&last), logits: true, ..Default::default() }).unwrap();
        let together_logits = together.logits.unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let single = Batch::right_padded(std::slice::from_ref(prompt), 0, &Device::Cpu).unwrap();
            let alone = model
                .forward(
                    &single,
                    &Request { capture_at: Some(&[prompt.len() - 1]), logits: true, ..Default::default() },
                )
                .unwrap();
            for (layer, (a, b)) in common::zip_exact(&alone.captured, &together.captured).enumerate() {
                let diff = max_abs_diff(&a.get(0).unwrap().to_vec1().unwrap(), &b.get(i).unwrap().to_vec1().unwrap());
                assert!(diff <= 1e-4, "{name} prompt {i} layer {layer}: batched differs by {diff}");
            }
            let n = prompt.len();
            let a = alone.logits.unwrap().get(0).unwrap();
            let b = together_logits.get(i).unwrap().narrow(0, 0, n).unwrap();
            let diff = max_abs_diff(&flat(&a), &flat(&b));
            assert!(diff <= 1e-4, "{name} prompt {i}: batched logits differ by {diff}");
        }
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
#[cfg_attr(not(all(fixture_shared, fixture_smollm2)), ignore = "needs BAKE_SHARED and BAKE_SMOLLM2 (see tests/common)")]
fn capture_only_pass_stops_early_with_the_same_activations() {
    for (name, dir, reference) in common::reference_models() {
        let reference: Value = serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
        let model = ModelFiles::open(dir.to_str().unwrap()).unwrap().load(&Device::Cpu).unwrap();
        let prompt = ids(&reference["cases"][0]["input_ids"]);
        let batch = Batch::right_padded(std::slice::from_ref(&prompt), 0, &Device::Cpu).unwrap();
        let at = [prompt.len() - 1];
        let full =
            model.forward(&batch, &Request { capture_at: Some(&at), logits: true, ..Default::default() }).unwrap();
        let short = model.forward(&batch, &Request { capture_at: Some(&at), ..Default::default() }).unwrap();
        assert!(short.logits.is_none());
        assert_eq!(short.captured.len(), model.config.num_layers, "{name}");
        for (a, b) in common::zip_exact(&full.captured, &short.captured) {
            assert_eq!(flat(a), flat(b), "{name}");
        }
    }
}

/// Packed as a prefix tree, with extra prompts that share leading tokens with the reference cases (a
/// truncation, an extension, a duplicate), every prompt still gets transformers' o_proj inputs and top-20
/// logits, and what it gets when run alone.
#[test]
#[cfg_attr(not(all(fixture_shared, fixture_smollm2)), ignore = "needs BAKE_SHARED and BAKE_SMOLLM2 (see tests/common)")]
fn prefix_tree_batch_equals_transformers_and_one_prompt_at_a_time() {
    for (name, dir, reference) in common::reference_models() {
        let reference: Value = serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
        let model = ModelFiles::open(dir.to_str().unwrap()).unwrap().load(&Device::Cpu).unwrap();
        let cases = reference["cases"].as_array().unwrap();
        let mut prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["input_ids"])).collect();
        let first = prompts[0].clone();
        prompts.push(first[..first.len() / 2].to_vec());
        prompts.push([first.as_slice(), &prompts[1][1..]].concat());
        prompts.push(first.clone());
        let (tree, last) = Batch::prefix_tree(&prompts, &Device::Cpu).unwrap();
        let shared = prompts.iter().map(Vec::len).sum::<usize>() - tree.len();
        assert!(shared >= first.len() * 2, "{name}: the tree should store the shared tokens once ({shared} saved)");
        let packed =
            model.forward(&tree, &Request { capture_at: Some(&last), logits: true, ..Default::default() }).unwrap();
        let packed_logits = packed.logits.unwrap().squeeze(0).unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let single = Batch::right_padded(std::slice::from_ref(prompt), 0, &Device::Cpu).unwrap();
            let alone = model
                .forward(
                    &single,
                    &Request { capture_at: Some(&single.last_tokens()), logits: true, ..Default::default() },
                )
                .unwrap();
            for (layer, (a, b)) in common::zip_exact(&alone.captured, &packed.captured).enumerate() {
                let diff = max_abs_diff(&flat(&a.get(0).unwrap()), &flat(&b.get(i).unwrap()));
                assert!(diff <= 1e-4, "{name} prompt {i} layer {layer}: packed differs from alone by {diff}");
            }
            let ours = flat(&packed_logits.get(last[i]).unwrap());
            let diff =
                max_abs_diff(&flat(&alone.logits.unwrap().squeeze(0).unwrap().get(prompt.len() - 1).unwrap()), &ours);
            assert!(diff <= 1e-4, "{name} prompt {i}: packed logits differ from alone by {diff}");
            if let Some(case) = cases.get(i) {
                let top_ids = ids(&case["last_logits_top20"]["ids"]);
                let top: Vec<f32> = top_ids.iter().map(|&t| ours[t as usize]).collect();
                let diff = max_abs_diff(&top, &floats(&case["last_logits_top20"]["values"]));
                assert!(diff <= 2e-3, "{name} case {i}: packed top-20 logits differ from transformers by {diff}");
                for (layer, values) in case["o_proj_input_last_token"].as_object().unwrap() {
                    let got = flat(&packed.captured[layer.parse::<usize>().unwrap()].get(i).unwrap());
                    let diff = max_abs_diff(&got, &floats(values));
                    assert!(
                        diff <= 1e-3,
                        "{name} case {i}: packed o_proj input of layer {layer} differs from transformers by {diff}"
                    );
                }
            }
        }
    }
}
