//! The LLM file: Qwen3 (llama.cpp `qwen3`) metadata, tokenizer and tensor list.

use crate::gguf::{TensorInfo, TensorType, Value};
use crate::vocab::{self, Vocab};
use crate::weights::Init;
use crate::{Planned, Quant, Spec};

/// What a weight matrix is, for choosing its type in a quantization mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Output,
    AttnV,
    FfnDown,
    Other,
}

/// llama-quantize's rule for which layers get more bits in the `_M` mixes.
fn use_more_bits(layer: u32, n_layer: u32) -> bool {
    layer < n_layer / 8
        || layer >= 7 * n_layer / 8
        || (layer as i64 - (n_layer / 8) as i64) % 3 == 2
}

/// The type a weight matrix with rows of `row` elements gets under `quant`.
fn weight_type(quant: Quant, role: Role, layer: u32, n_layer: u32, row: u64) -> TensorType {
    let wanted = match quant {
        Quant::F32 => TensorType::F32,
        Quant::F16 => TensorType::F16,
        Quant::Q8_0 => TensorType::Q8_0,
        Quant::Q4_K_M => match role {
            Role::Output => TensorType::Q6K,
            Role::AttnV | Role::FfnDown if use_more_bits(layer, n_layer) => TensorType::Q6K,
            _ => TensorType::Q4K,
        },
    };
    // Rows must hold whole blocks; llama-quantize falls back the same way.
    if row.is_multiple_of(wanted.block_elems()) {
        wanted
    } else if row.is_multiple_of(TensorType::Q8_0.block_elems()) {
        TensorType::Q8_0
    } else {
        TensorType::F16
    }
}

/// The LLM file's metadata and tensors. Long because it is a table: one line per GGUF key and
/// tensor in the order llama.cpp's loader lists them, which reads best as one list.
pub(crate) fn plan(spec: &Spec) -> (Vec<(String, Value)>, Vec<Planned>) {
    let l = &spec.llm;
    let vocab = Vocab::build(l.n_vocab);
    let words = vocab.words();
    let kv = |k: &str, v: Value| (k.to_string(), v);
    let kvs = vec![
        kv("general.architecture", Value::Str("qwen3".into())),
        kv("general.type", Value::Str("model".into())),
        kv(
            "general.name",
            Value::Str(format!("MiniCPM-o 4.5 {} (random weights)", spec.size)),
        ),
        kv("general.file_type", Value::U32(spec.quant.file_type())),
        kv("general.quantization_version", Value::U32(2)),
        kv("qwen3.block_count", Value::U32(l.n_layer)),
        kv("qwen3.context_length", Value::U32(l.n_ctx_train)),
        kv("qwen3.embedding_length", Value::U32(l.n_embd)),
        kv("qwen3.feed_forward_length", Value::U32(l.n_ff)),
        kv("qwen3.attention.head_count", Value::U32(l.n_head)),
        kv("qwen3.attention.head_count_kv", Value::U32(l.n_head_kv)),
        kv("qwen3.attention.key_length", Value::U32(l.head_dim)),
        kv("qwen3.attention.value_length", Value::U32(l.head_dim)),
        kv("qwen3.rope.freq_base", Value::F32(l.rope_freq_base)),
        kv("qwen3.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        kv("tokenizer.ggml.model", Value::Str("gpt2".into())),
        kv("tokenizer.ggml.pre", Value::Str("qwen2".into())),
        kv(
            "tokenizer.ggml.bos_token_id",
            Value::U32(vocab.id(vocab::ENDOFTEXT)),
        ),
        kv(
            "tokenizer.ggml.eos_token_id",
            Value::U32(vocab.id(vocab::ENDOFTEXT)),
        ),
        kv(
            "tokenizer.ggml.padding_token_id",
            Value::U32(vocab.id(vocab::ENDOFTEXT)),
        ),
        kv(
            "tokenizer.ggml.eot_token_id",
            Value::U32(vocab.id(vocab::IM_END)),
        ),
        kv(
            "tokenizer.ggml.unknown_token_id",
            Value::U32(vocab.id(vocab::UNK)),
        ),
        kv("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        kv(
            "tokenizer.chat_template",
            Value::Str(vocab::CHAT_TEMPLATE.into()),
        ),
        kv("tokenizer.ggml.tokens", Value::ArrStr(vocab.tokens)),
        kv("tokenizer.ggml.token_type", Value::ArrI32(vocab.types)),
        kv("tokenizer.ggml.merges", Value::ArrStr(vocab.merges)),
    ];

    let (e, v, n) = (u64::from(l.n_embd), u64::from(l.n_vocab), l.n_layer);
    let (q, kvw, ff) = (
        u64::from(l.n_head * l.head_dim),
        u64::from(l.n_head_kv * l.head_dim),
        u64::from(l.n_ff),
    );
    let mut tensors = Vec::new();
    let mut matrix = |name: String, row: u64, rows: u64, role: Role, layer: u32| {
        let ty = weight_type(spec.quant, role, layer, n, row);
        let std = 1.0 / (row as f32).sqrt();
        let init = match role {
            Role::Output => Init::Logits {
                std,
                loud_from: words.start,
                loud_to: words.end,
            },
            _ => Init::Random { std },
        };
        tensors.push((
            TensorInfo {
                name,
                dims: vec![row, rows],
                ty,
            },
            init,
        ));
    };
    matrix("token_embd.weight".into(), e, v, Role::Other, 0);
    for i in 0..n {
        matrix(format!("blk.{i}.attn_q.weight"), e, q, Role::Other, i);
        matrix(format!("blk.{i}.attn_k.weight"), e, kvw, Role::Other, i);
        matrix(format!("blk.{i}.attn_v.weight"), e, kvw, Role::AttnV, i);
        matrix(format!("blk.{i}.attn_output.weight"), q, e, Role::Other, i);
        matrix(format!("blk.{i}.ffn_gate.weight"), e, ff, Role::Other, i);
        matrix(format!("blk.{i}.ffn_up.weight"), e, ff, Role::Other, i);
        matrix(format!("blk.{i}.ffn_down.weight"), ff, e, Role::FfnDown, i);
    }
    matrix("output.weight".into(), e, v, Role::Output, 0);

    let norm = |name: String, len: u64| {
        (
            TensorInfo {
                name,
                dims: vec![len],
                ty: TensorType::F32,
            },
            Init::Const(1.0),
        )
    };
    for i in 0..n {
        tensors.push(norm(format!("blk.{i}.attn_norm.weight"), e));
        tensors.push(norm(
            format!("blk.{i}.attn_q_norm.weight"),
            u64::from(l.head_dim),
        ));
        tensors.push(norm(
            format!("blk.{i}.attn_k_norm.weight"),
            u64::from(l.head_dim),
        ));
        tensors.push(norm(format!("blk.{i}.ffn_norm.weight"), e));
    }
    tensors.push(norm("output_norm.weight".into(), e));
    (kvs, tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::read;
    use crate::weights::tests::dequantize;
    use crate::{write_pair, Quant};

    /// Types of the tensors named `name` or `blk.N.name`, in order.
    fn types(tensors: &[Planned], name: &str) -> Vec<TensorType> {
        let layer = format!(".{name}");
        tensors
            .iter()
            .filter(|(t, _)| t.name == name || t.name.ends_with(&layer))
            .map(|(t, _)| t.ty)
            .collect()
    }

    #[test]
    fn q4_k_m_mix_follows_llama_quantize() {
        let (_, t) = plan(&Spec::minicpm_o_4_5(Quant::Q4_K_M));
        assert_eq!(types(&t, "output.weight"), [TensorType::Q6K]);
        assert_eq!(types(&t, "token_embd.weight"), [TensorType::Q4K]);
        assert!(types(&t, "attn_q.weight")
            .iter()
            .all(|&ty| ty == TensorType::Q4K));
        let v = types(&t, "attn_v.weight");
        let more = v.iter().filter(|&&ty| ty == TensorType::Q6K).count();
        assert_eq!(v.len(), 36);
        assert_eq!(more, 18, "half the layers get Q6_K");
        assert_eq!(v, types(&t, "ffn_down.weight"));
        for norm in [
            "attn_norm.weight",
            "attn_q_norm.weight",
            "ffn_norm.weight",
            "output_norm.weight",
        ] {
            assert!(
                types(&t, norm).iter().all(|&ty| ty == TensorType::F32),
                "{norm}"
            );
        }
        // The 8B's size: ~5 GB, like the real Q4_K_M file.
        let bytes: u64 = t.iter().map(|(i, _)| i.n_bytes()).sum();
        assert!((4_500_000_000..5_500_000_000).contains(&bytes), "{bytes}");
    }

    #[test]
    fn rows_that_do_not_fit_k_blocks_fall_back() {
        let mut spec = Spec::tiny();
        spec.quant = Quant::Q4_K_M;
        let (_, t) = plan(&spec);
        // n_embd 128 cannot hold a 256-element K block; n_ff 256 can.
        assert_eq!(types(&t, "attn_q.weight"), [TensorType::Q8_0; 2]);
        assert_eq!(
            types(&t, "ffn_down.weight"),
            [TensorType::Q4K, TensorType::Q6K]
        );
    }

    #[test]
    fn written_llm_has_qwen3_metadata_tokenizer_and_sane_weights() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec::tiny();
        let pair = write_pair(dir.path(), &spec).unwrap();
        let bytes = std::fs::read(&pair.llm).unwrap();
        let f = read::parse(&bytes);
        assert_eq!(f.version, 3);
        assert_eq!(
            f.get("general.architecture"),
            Some(&Value::Str("qwen3".into()))
        );
        assert_eq!(f.get("general.file_type"), Some(&Value::U32(7)));
        assert_eq!(f.get("qwen3.embedding_length"), Some(&Value::U32(128)));
        assert_eq!(f.get("qwen3.block_count"), Some(&Value::U32(2)));
        assert_eq!(
            f.get("tokenizer.ggml.model"),
            Some(&Value::Str("gpt2".into()))
        );
        assert_eq!(
            f.get("tokenizer.ggml.pre"),
            Some(&Value::Str("qwen2".into()))
        );
        let Some(Value::ArrStr(tokens)) = f.get("tokenizer.ggml.tokens") else {
            panic!("tokens")
        };
        let Some(Value::ArrI32(types)) = f.get("tokenizer.ggml.token_type") else {
            panic!("types")
        };
        assert_eq!(tokens.len(), 512);
        assert_eq!(types.len(), 512);
        let id = |key: &str| match f.get(key) {
            Some(Value::U32(id)) => tokens[*id as usize].as_str(),
            other => panic!("{key}: {other:?}"),
        };
        assert_eq!(id("tokenizer.ggml.eos_token_id"), "<|endoftext|>");
        assert_eq!(id("tokenizer.ggml.eot_token_id"), "<|im_end|>");
        assert_eq!(id("tokenizer.ggml.padding_token_id"), "<|endoftext|>");
        for special in [
            "<|im_start|>",
            "<think>",
            "</think>",
            "<image>",
            "</image>",
            "<slice>",
            "</slice>",
        ] {
            let at = tokens
                .iter()
                .position(|t| t == special)
                .unwrap_or_else(|| panic!("{special}"));
            assert_eq!(types[at], 3, "{special} is CONTROL");
        }
        // 2 layers x 11 tensors + embeddings, output, output norm.
        assert_eq!(f.tensors.len(), 2 * 11 + 3);
        let (info, at) = f.tensor("blk.1.ffn_down.weight").unwrap();
        assert_eq!(info.dims, [256, 128]);
        assert_eq!(info.ty, TensorType::Q8_0);
        let data = &bytes[*at as usize..][..info.n_bytes() as usize];
        assert!(dequantize(info.ty, data)
            .iter()
            .all(|x| x.is_finite() && x.abs() < 1.0));
        let (info, at) = f.tensor("output_norm.weight").unwrap();
        let data = &bytes[*at as usize..][..info.n_bytes() as usize];
        assert!(dequantize(info.ty, data).iter().all(|&x| x == 1.0));
    }
}
