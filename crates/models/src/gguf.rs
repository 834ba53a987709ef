//! A GGUF header reader: enough to tell an LLM from a projector and a whole file from a
//! truncated one before llama.cpp opens it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// Arrays are skipped, only their length is kept.
    Array(u64),
}

#[derive(Debug, Clone)]
pub struct GgufInfo {
    pub version: u32,
    pub architecture: String,
    /// For projectors: whether `clip.has_vision_encoder` is set.
    pub has_vision: bool,
    pub tensors: u64,
    pub metadata: HashMap<String, Value>,
    /// Bytes the header and the tensor data need; the file must be at least this long.
    pub needed_bytes: u64,
}

const MAX_STRING: u64 = 1 << 24;
const MAX_COUNT: u64 = 1 << 24;

impl GgufInfo {
    pub fn read(path: &Path) -> Result<GgufInfo, String> {
        let shown = path.display();
        let file = File::open(path).map_err(|e| format!("cannot open '{shown}': {e}"))?;
        let len = file
            .metadata()
            .map_err(|e| format!("cannot read '{shown}': {e}"))?
            .len();
        let mut r = Reader {
            inner: BufReader::new(file),
            pos: 0,
        };
        let info =
            read_header(&mut r).map_err(|e| format!("'{shown}' is not a usable GGUF file: {e}"))?;
        if len < info.needed_bytes {
            return Err(format!(
                "'{shown}' is truncated: {len} bytes, but its header describes {} (an interrupted download?)",
                info.needed_bytes
            ));
        }
        Ok(info)
    }
}

/// The header of a GGUF file held in memory, for the fuzz target in `fuzz/` (not an API):
/// what [`GgufInfo::read`] reads, without the length check.
#[doc(hidden)]
pub fn read_header_bytes(bytes: &[u8]) -> Result<GgufInfo, String> {
    read_header(&mut Reader {
        inner: bytes,
        pos: 0,
    })
}

struct Reader<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| "it ends inside its header".to_string())?;
        self.pos += N as u64;
        Ok(buf)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return Err(format!("a string of {n} bytes in the header"));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| "it ends inside its header".to_string())?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
    fn value(&mut self, kind: u32) -> Result<Value, String> {
        Ok(match kind {
            0 => Value::Int(self.bytes::<1>()?[0] as i64),
            1 => Value::Int(self.bytes::<1>()?[0] as i8 as i64),
            2 => Value::Int(u16::from_le_bytes(self.bytes()?) as i64),
            3 => Value::Int(i16::from_le_bytes(self.bytes()?) as i64),
            4 => Value::Int(self.u32()? as i64),
            5 => Value::Int(i32::from_le_bytes(self.bytes()?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.bytes()?) as f64),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let item = self.u32()?;
                let n = self.u64()?;
                if n > MAX_COUNT || item == 9 {
                    return Err(format!("an array of {n} items"));
                }
                for _ in 0..n {
                    self.value(item)?;
                }
                Value::Array(n)
            }
            10 => Value::Int(self.u64()? as i64),
            11 => Value::Int(i64::from_le_bytes(self.bytes()?)),
            12 => Value::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(format!("unknown metadata type {other}")),
        })
    }
}

/// (bytes per block, elements per block) of ggml's tensor types, by type id.
fn block_size(kind: u32) -> Option<(u64, u64)> {
    Some(match kind {
        0 => (4, 1),      // F32
        1 => (2, 1),      // F16
        2 => (18, 32),    // Q4_0
        3 => (20, 32),    // Q4_1
        6 => (22, 32),    // Q5_0
        7 => (24, 32),    // Q5_1
        8 => (34, 32),    // Q8_0
        9 => (36, 32),    // Q8_1
        10 => (84, 256),  // Q2_K
        11 => (110, 256), // Q3_K
        12 => (144, 256), // Q4_K
        13 => (176, 256), // Q5_K
        14 => (210, 256), // Q6_K
        15 => (292, 256), // Q8_K
        16 => (66, 256),  // IQ2_XXS
        17 => (74, 256),  // IQ2_XS
        18 => (98, 256),  // IQ3_XXS
        19 => (50, 256),  // IQ1_S
        20 => (18, 32),   // IQ4_NL
        21 => (110, 256), // IQ3_S
        22 => (82, 256),  // IQ2_S
        23 => (136, 256), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (2, 1),     // I16
        26 => (4, 1),     // I32
        27 => (8, 1),     // I64
        28 => (8, 1),     // F64
        29 => (56, 256),  // IQ1_M
        30 => (2, 1),     // BF16
        _ => return None,
    })
}

fn read_header<R: Read>(r: &mut Reader<R>) -> Result<GgufInfo, String> {
    let magic = r
        .bytes::<4>()
        .map_err(|_| "it is shorter than a GGUF header".to_string())?;
    if &magic != b"GGUF" {
        return Err("it does not start with the GGUF magic bytes".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported"));
    }
    let tensors = r.u64()?;
    let kvs = r.u64()?;
    if tensors > MAX_COUNT || kvs > MAX_COUNT {
        return Err(format!(
            "implausible counts ({tensors} tensors, {kvs} metadata keys)"
        ));
    }
    let mut metadata = HashMap::new();
    for _ in 0..kvs {
        let key = r.string()?;
        let kind = r.u32()?;
        let value = r.value(kind)?;
        metadata.insert(key, value);
    }
    let mut data_end = 0u64;
    let mut sizes_known = true;
    for _ in 0..tensors {
        let _name = r.string()?;
        let dims = r.u32()?;
        if dims > 8 {
            return Err(format!("a tensor with {dims} dimensions"));
        }
        let mut elements = 1u64;
        for _ in 0..dims {
            elements = elements.saturating_mul(r.u64()?);
        }
        let kind = r.u32()?;
        let offset = r.u64()?;
        match block_size(kind) {
            Some((bytes, per)) => {
                data_end = data_end
                    .max(offset.saturating_add(elements.div_ceil(per).saturating_mul(bytes)))
            }
            None => sizes_known = false,
        }
    }
    let alignment = match metadata.get("general.alignment") {
        Some(Value::Int(a)) if *a > 0 => *a as u64,
        _ => 32,
    };
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let architecture = match metadata.get("general.architecture") {
        Some(Value::Str(s)) => s.clone(),
        _ => return Err("it has no general.architecture".into()),
    };
    let has_vision = matches!(
        metadata.get("clip.has_vision_encoder"),
        Some(Value::Bool(true))
    );
    Ok(GgufInfo {
        version,
        architecture,
        has_vision,
        tensors,
        metadata,
        // Saturating: a header may claim any size; the file's length then refuses it.
        needed_bytes: if sizes_known {
            data_start.saturating_add(data_end)
        } else {
            data_start
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// A minimal GGUF: one string KV and one F32 tensor of 8 elements.
    fn tiny_gguf(arch: &str, with_data: bool) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&1u64.to_le_bytes()); // kvs
        let key = "general.architecture";
        b.extend_from_slice(&(key.len() as u64).to_le_bytes());
        b.extend_from_slice(key.as_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&(arch.len() as u64).to_le_bytes());
        b.extend_from_slice(arch.as_bytes());
        let name = "w";
        b.extend_from_slice(&(name.len() as u64).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&8u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // F32
        b.extend_from_slice(&0u64.to_le_bytes()); // offset
        while b.len() % 32 != 0 {
            b.push(0);
        }
        if with_data {
            b.extend_from_slice(&[0u8; 32]);
        }
        b
    }

    #[test]
    fn reads_architecture_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let info = GgufInfo::read(&write(dir.path(), "a.gguf", &tiny_gguf("qwen3", true))).unwrap();
        assert_eq!(info.architecture, "qwen3");
        assert_eq!(info.tensors, 1);
        assert_eq!(info.needed_bytes % 32, 0);
    }

    #[test]
    fn rejects_truncated_garbage_and_empty() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            GgufInfo::read(&write(dir.path(), "t.gguf", &tiny_gguf("qwen3", false))).unwrap_err();
        assert!(err.contains("is truncated"), "{err}");
        let err = GgufInfo::read(&write(dir.path(), "g.gguf", b"this is not a model at all"))
            .unwrap_err();
        assert!(err.contains("does not start with the GGUF magic"), "{err}");
        let err = GgufInfo::read(&write(dir.path(), "e.gguf", b"")).unwrap_err();
        assert!(err.contains("shorter than a GGUF header"), "{err}");
        let full = tiny_gguf("qwen3", true);
        let err = GgufInfo::read(&write(dir.path(), "h.gguf", &full[..40])).unwrap_err();
        assert!(err.contains("ends inside its header"), "{err}");
        let err = GgufInfo::read(&dir.path().join("missing.gguf")).unwrap_err();
        assert!(err.contains("cannot open"), "{err}");
    }

    /// Found writing `fuzz/fuzz_targets/gguf_header.rs`: a tensor claiming 2^64-1 elements made
    /// the size sum overflow (a panic in a debug build, a wrong size in release). The size
    /// saturates now, and the file is refused as truncated.
    #[test]
    fn fuzz_huge_tensor_sizes_are_refused_not_overflowed() {
        let mut bytes = tiny_gguf("qwen3", true);
        let dim = bytes
            .windows(8)
            .rposition(|w| w == 8u64.to_le_bytes())
            .unwrap();
        bytes[dim..dim + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(read_header_bytes(&bytes).unwrap().needed_bytes, u64::MAX);
        let dir = tempfile::tempdir().unwrap();
        let err = GgufInfo::read(&write(dir.path(), "huge.gguf", &bytes)).unwrap_err();
        assert!(err.contains("is truncated"), "{err}");
    }
}
