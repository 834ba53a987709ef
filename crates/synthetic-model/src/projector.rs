//! The projector file: clip metadata and tensors of a MiniCPM-V SigLIP tower + resampler,
//! named and shaped as llama.cpp's clip loader expects for projector type `resampler`.
//!
//! As in the official converter, 2-D weight matrices and the patch convolution are F16 and
//! everything else (biases, norms, the resampler's queries and positional table) is F32.

use crate::gguf::{TensorInfo, TensorType, Value};
use crate::weights::Init;
use crate::{Planned, Spec, VISION_POSITIONS};

/// `clip.minicpmv_version` for MiniCPM-o 4.5: llama.cpp uses it for the slice template
/// (`<image>`…`</image><slice>`…`</slice>`) and the 64-query default.
pub const MINICPMV_VERSION: i32 = 100_045;

/// The projector file's metadata and tensors. Long because it is a table: one line per GGUF
/// key and tensor as llama.cpp's clip loader expects them, which reads best as one list.
pub(crate) fn plan(spec: &Spec) -> (Vec<(String, Value)>, Vec<Planned>) {
    let v = &spec.vision;
    let kv = |k: &str, val: Value| (k.to_string(), val);
    let kvs = vec![
        kv("general.architecture", Value::Str("clip".into())),
        kv(
            "general.name",
            Value::Str(format!(
                "MiniCPM-o 4.5 {} vision (random weights)",
                spec.size
            )),
        ),
        kv(
            "general.description",
            Value::Str("image encoder for MiniCPM-V".into()),
        ),
        kv("general.file_type", Value::U32(1)),
        kv("clip.has_text_encoder", Value::Bool(false)),
        kv("clip.has_vision_encoder", Value::Bool(true)),
        kv("clip.has_minicpmv_projector", Value::Bool(true)),
        kv("clip.projector_type", Value::Str("resampler".into())),
        kv("clip.minicpmv_version", Value::I32(MINICPMV_VERSION)),
        kv("clip.minicpmv_query_num", Value::U32(v.n_query)),
        kv("clip.use_gelu", Value::Bool(true)),
        kv("clip.vision.image_size", Value::U32(v.image_size)),
        kv("clip.vision.patch_size", Value::U32(v.patch_size)),
        kv("clip.vision.embedding_length", Value::U32(v.n_embd)),
        kv("clip.vision.feed_forward_length", Value::U32(v.n_ff)),
        kv("clip.vision.projection_dim", Value::U32(0)),
        kv("clip.vision.attention.head_count", Value::U32(v.n_head)),
        kv("clip.vision.attention.layer_norm_epsilon", Value::F32(1e-6)),
        kv("clip.vision.block_count", Value::U32(v.n_layer)),
        kv("clip.vision.image_mean", Value::ArrF32(vec![0.5; 3])),
        kv("clip.vision.image_std", Value::ArrF32(vec![0.5; 3])),
    ];

    let (w, ff, e) = (
        u64::from(v.n_embd),
        u64::from(v.n_ff),
        u64::from(spec.llm.n_embd),
    );
    let mut t = Tensors(Vec::new());

    // Resampler: 64 learned queries cross-attend to the slice's patches (K/V from `kv`),
    // then `proj` maps to the LLM width. The attention runs at the LLM width, 128 per head.
    t.add(
        "resampler.pos_embed_k",
        vec![e, VISION_POSITIONS],
        TensorType::F32,
        Init::Random { std: 0.5 },
    );
    t.add(
        "resampler.query",
        vec![e, u64::from(v.n_query)],
        TensorType::F32,
        Init::Random { std: 0.02 },
    );
    t.add(
        "resampler.kv.weight",
        vec![w, e],
        TensorType::F16,
        fan_in(w),
    );
    for name in ["q", "k", "v", "out"] {
        t.linear(&format!("resampler.attn.{name}"), e, e);
    }
    for name in ["q", "kv", "post"] {
        t.layer_norm(&format!("resampler.ln_{name}"), e);
    }
    t.add(
        "resampler.proj.weight",
        vec![e, e],
        TensorType::F16,
        fan_in(e),
    );

    // SigLIP: patch convolution, learned positions, pre-norm encoder layers, final norm.
    let p = u64::from(v.patch_size);
    t.add(
        "v.patch_embd.weight",
        vec![p, p, 3, w],
        TensorType::F16,
        fan_in(3 * p * p),
    );
    t.add("v.patch_embd.bias", vec![w], TensorType::F32, BIAS);
    t.add(
        "v.position_embd.weight",
        vec![w, VISION_POSITIONS],
        TensorType::F16,
        Init::Random { std: 0.02 },
    );
    for i in 0..v.n_layer {
        for name in ["attn_q", "attn_k", "attn_v", "attn_out"] {
            t.linear(&format!("v.blk.{i}.{name}"), w, w);
        }
        t.layer_norm(&format!("v.blk.{i}.ln1"), w);
        t.layer_norm(&format!("v.blk.{i}.ln2"), w);
        t.linear(&format!("v.blk.{i}.ffn_up"), w, ff);
        t.linear(&format!("v.blk.{i}.ffn_down"), ff, w);
    }
    t.layer_norm("v.post_ln", w);
    (kvs, t.0)
}

const BIAS: Init = Init::Random { std: 0.01 };

/// Unit-scale noise for a matrix reading `n` inputs.
fn fan_in(n: u64) -> Init {
    Init::Random {
        std: 1.0 / (n as f32).sqrt(),
    }
}

struct Tensors(Vec<Planned>);

impl Tensors {
    fn add(&mut self, name: &str, dims: Vec<u64>, ty: TensorType, init: Init) {
        self.0.push((
            TensorInfo {
                name: name.to_string(),
                dims,
                ty,
            },
            init,
        ));
    }

    /// `<name>.weight` (F16, `n_in` x `n_out`) and `<name>.bias`.
    fn linear(&mut self, name: &str, n_in: u64, n_out: u64) {
        self.add(
            &format!("{name}.weight"),
            vec![n_in, n_out],
            TensorType::F16,
            fan_in(n_in),
        );
        self.add(&format!("{name}.bias"), vec![n_out], TensorType::F32, BIAS);
    }

    fn layer_norm(&mut self, name: &str, n: u64) {
        self.add(
            &format!("{name}.weight"),
            vec![n],
            TensorType::F32,
            Init::Const(1.0),
        );
        self.add(&format!("{name}.bias"), vec![n], TensorType::F32, BIAS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::read;
    use crate::weights::tests::dequantize;
    use crate::{write_pair, Quant};

    #[test]
    fn full_size_projector_matches_minicpm_o_4_5() {
        let (_, t) = plan(&Spec::minicpm_o_4_5(Quant::Q4_K_M));
        // 18 resampler + 5 embedding/final-norm tensors + 16 per layer, as the official file.
        assert_eq!(t.len(), 18 + 5 + 16 * 26);
        let dims = |name: &str| {
            t.iter()
                .find(|(i, _)| i.name == name)
                .map(|(i, _)| i.dims.clone())
                .unwrap()
        };
        assert_eq!(dims("resampler.proj.weight"), [4096, 4096]);
        assert_eq!(dims("resampler.kv.weight"), [1152, 4096]);
        assert_eq!(dims("resampler.query"), [4096, 64]);
        assert_eq!(dims("v.position_embd.weight"), [1152, 4900]);
        assert_eq!(dims("v.blk.25.ffn_up.weight"), [1152, 4304]);
        assert_eq!(dims("v.blk.25.ffn_down.weight"), [4304, 1152]);
        let bytes: u64 = t.iter().map(|(i, _)| i.n_bytes()).sum();
        assert!((900_000_000..1_200_000_000).contains(&bytes), "{bytes}");
    }

    #[test]
    fn written_projector_has_clip_metadata_and_sane_weights() {
        let dir = tempfile::tempdir().unwrap();
        let pair = write_pair(dir.path(), &Spec::tiny()).unwrap();
        assert!(pair
            .mmproj
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .contains("mmproj"));
        let bytes = std::fs::read(&pair.mmproj).unwrap();
        let f = read::parse(&bytes);
        assert_eq!(
            f.get("general.architecture"),
            Some(&Value::Str("clip".into()))
        );
        assert_eq!(
            f.get("clip.projector_type"),
            Some(&Value::Str("resampler".into()))
        );
        assert_eq!(f.get("clip.minicpmv_version"), Some(&Value::I32(100_045)));
        assert_eq!(f.get("clip.vision.block_count"), Some(&Value::U32(2)));
        assert_eq!(
            f.get("clip.vision.image_mean"),
            Some(&Value::ArrF32(vec![0.5; 3]))
        );
        assert_eq!(f.get("clip.has_vision_encoder"), Some(&Value::Bool(true)));
        // The resampler's output width is the LLM's, which mtmd checks.
        let (proj, _) = f.tensor("resampler.proj.weight").unwrap();
        assert_eq!(proj.dims, [128, 128]);
        assert!(f.tensor("v.blk.1.attn_out.weight").is_some());
        assert!(f.tensor("v.blk.2.attn_out.weight").is_none());
        for (info, at) in &f.tensors {
            let data = &bytes[*at as usize..][..info.n_bytes() as usize];
            assert!(
                dequantize(info.ty, data).iter().all(|x| x.is_finite()),
                "{}",
                info.name
            );
        }
    }
}
