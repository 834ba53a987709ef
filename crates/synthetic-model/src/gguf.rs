//! A streaming GGUF v3 writer.
//!
//! GGUF puts every tensor's offset in the header, before any data, and offsets follow from
//! shapes and types alone. So the writer takes the whole tensor list up front, writes the
//! header, and then asks for each tensor's bytes in order: a multi-gigabyte model is produced
//! chunk by chunk and never held in memory.

use std::io::{self, Write};

/// Data alignment, GGUF's default (`general.alignment` is not written, so readers assume it).
pub const ALIGNMENT: u64 = 32;

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;

/// A metadata value. Only the kinds the model files need.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    ArrStr(Vec<String>),
    ArrI32(Vec<i32>),
    ArrF32(Vec<f32>),
}

// GGUF value type ids (gguf.h `enum gguf_type`).
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARR: u32 = 9;

/// The ggml tensor types this crate writes, with their ggml ids and block layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    Q8_0,
    Q4K,
    Q6K,
}

impl TensorType {
    /// ggml's `enum ggml_type` value.
    pub fn id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q8_0 => 8,
            TensorType::Q4K => 12,
            TensorType::Q6K => 14,
        }
    }

    /// Elements per block; a row (the first dimension) must be a multiple of it.
    pub fn block_elems(self) -> u64 {
        match self {
            TensorType::F32 | TensorType::F16 => 1,
            TensorType::Q8_0 => 32,
            TensorType::Q4K | TensorType::Q6K => 256,
        }
    }

    /// Bytes per block (`sizeof(block_q8_0)` etc. in ggml-common.h).
    pub fn block_bytes(self) -> u64 {
        match self {
            TensorType::F32 => 4,
            TensorType::F16 => 2,
            TensorType::Q8_0 => 34,
            TensorType::Q4K => 144,
            TensorType::Q6K => 210,
        }
    }
}

/// One tensor's header entry. `dims` are in ggml order: `dims[0]` is the row length.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: TensorType,
}

impl TensorInfo {
    pub fn n_elems(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Size of the tensor's data, without alignment padding.
    pub fn n_bytes(&self) -> u64 {
        self.n_elems() / self.ty.block_elems() * self.ty.block_bytes()
    }
}

fn pad(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// Writes a GGUF file: `new` writes the header, then `tensor` is called once per tensor,
/// in the order given, with a closure that fills the data.
pub struct Writer<W: Write> {
    out: W,
    tensors: Vec<TensorInfo>,
    next: usize,
}

impl<W: Write> Writer<W> {
    /// Writes magic, version, metadata and tensor infos, padded to the data section.
    pub fn new(mut out: W, kvs: &[(String, Value)], tensors: Vec<TensorInfo>) -> io::Result<Self> {
        let mut head = Vec::with_capacity(1 << 16);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (key, value) in kvs {
            put_str(&mut head, key);
            put_value(&mut head, value);
        }
        let mut offset = 0u64;
        for t in &tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += pad(t.n_bytes());
        }
        head.resize(pad(head.len() as u64) as usize, 0);
        out.write_all(&head)?;
        Ok(Writer {
            out,
            tensors,
            next: 0,
        })
    }

    /// The info of the tensor whose data is due next, if any.
    pub fn next_tensor(&self) -> Option<&TensorInfo> {
        self.tensors.get(self.next)
    }

    /// Writes the next tensor's data. `fill` is called repeatedly with `(offset, buffer)` and
    /// must fill the whole buffer with the tensor's bytes from `offset` on; buffers always
    /// hold whole blocks, so a fill function can work block by block.
    pub fn tensor(
        &mut self,
        buf: &mut Vec<u8>,
        mut fill: impl FnMut(u64, &mut [u8]),
    ) -> io::Result<u64> {
        let info = self
            .tensors
            .get(self.next)
            .expect("more tensors written than declared");
        let block = info.ty.block_bytes() as usize;
        let chunk = (CHUNK_BYTES / block).max(1) * block;
        let total = info.n_bytes();
        let mut left = total;
        while left > 0 {
            let n = (left as usize).min(chunk);
            buf.resize(n, 0);
            fill(total - left, &mut buf[..n]);
            self.out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        let padding = (pad(total) - total) as usize;
        self.out.write_all(&[0u8; ALIGNMENT as usize][..padding])?;
        self.next += 1;
        Ok(total)
    }

    /// Checks every declared tensor was written and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        assert_eq!(
            self.next,
            self.tensors.len(),
            "tensors declared but not written"
        );
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Bytes generated per write; large enough to amortise the syscalls, small enough for cache.
const CHUNK_BYTES: usize = 4 << 20;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U32(x) => {
            out.extend_from_slice(&T_U32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::I32(x) => {
            out.extend_from_slice(&T_I32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::F32(x) => {
            out.extend_from_slice(&T_F32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::Bool(x) => {
            out.extend_from_slice(&T_BOOL.to_le_bytes());
            out.push(u8::from(*x));
        }
        Value::Str(s) => {
            out.extend_from_slice(&T_STR.to_le_bytes());
            put_str(out, s);
        }
        Value::ArrStr(items) => {
            put_array_head(out, T_STR, items.len());
            for s in items {
                put_str(out, s);
            }
        }
        Value::ArrI32(items) => {
            put_array_head(out, T_I32, items.len());
            for x in items {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        Value::ArrF32(items) => {
            put_array_head(out, T_F32, items.len());
            for x in items {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

fn put_array_head(out: &mut Vec<u8>, elem: u32, len: usize) {
    out.extend_from_slice(&T_ARR.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
}

#[cfg(test)]
pub(crate) mod read {
    //! A minimal GGUF reader, only for checking what the writer produced.

    use super::*;

    #[derive(Debug)]
    pub struct File {
        pub version: u32,
        pub kvs: Vec<(String, Value)>,
        /// (info, absolute file offset of the data)
        pub tensors: Vec<(TensorInfo, u64)>,
    }

    impl File {
        pub fn get(&self, key: &str) -> Option<&Value> {
            self.kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
        }

        pub fn tensor(&self, name: &str) -> Option<&(TensorInfo, u64)> {
            self.tensors.iter().find(|(t, _)| t.name == name)
        }
    }

    struct Cursor<'a> {
        b: &'a [u8],
        at: usize,
    }

    impl Cursor<'_> {
        fn take(&mut self, n: usize) -> &[u8] {
            let s = &self.b[self.at..self.at + n];
            self.at += n;
            s
        }
        fn u32(&mut self) -> u32 {
            u32::from_le_bytes(self.take(4).try_into().unwrap())
        }
        fn u64(&mut self) -> u64 {
            u64::from_le_bytes(self.take(8).try_into().unwrap())
        }
        fn str(&mut self) -> String {
            let n = self.u64() as usize;
            String::from_utf8(self.take(n).to_vec()).unwrap()
        }
        fn value(&mut self, ty: u32) -> Value {
            match ty {
                T_U32 => Value::U32(self.u32()),
                T_I32 => Value::I32(self.u32() as i32),
                T_F32 => Value::F32(f32::from_bits(self.u32())),
                T_BOOL => Value::Bool(self.take(1)[0] != 0),
                T_STR => Value::Str(self.str()),
                T_ARR => {
                    let elem = self.u32();
                    let n = self.u64() as usize;
                    match elem {
                        T_STR => Value::ArrStr((0..n).map(|_| self.str()).collect()),
                        T_I32 => Value::ArrI32((0..n).map(|_| self.u32() as i32).collect()),
                        T_F32 => {
                            Value::ArrF32((0..n).map(|_| f32::from_bits(self.u32())).collect())
                        }
                        other => panic!("array of type {other} not expected"),
                    }
                }
                other => panic!("value type {other} not expected"),
            }
        }
    }

    fn tensor_type(id: u32) -> TensorType {
        [
            TensorType::F32,
            TensorType::F16,
            TensorType::Q8_0,
            TensorType::Q4K,
            TensorType::Q6K,
        ]
        .into_iter()
        .find(|t| t.id() == id)
        .unwrap_or_else(|| panic!("tensor type {id} not expected"))
    }

    /// Parses `bytes` and checks the structural rules llama.cpp's loader enforces.
    pub fn parse(bytes: &[u8]) -> File {
        let mut c = Cursor { b: bytes, at: 0 };
        assert_eq!(c.take(4), MAGIC, "magic");
        let version = c.u32();
        let n_tensors = c.u64() as usize;
        let n_kv = c.u64() as usize;
        let mut kvs = Vec::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.str();
            let ty = c.u32();
            kvs.push((key, c.value(ty)));
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.str();
            let n_dims = c.u32() as usize;
            let dims = (0..n_dims).map(|_| c.u64()).collect();
            let ty = tensor_type(c.u32());
            let offset = c.u64();
            infos.push((TensorInfo { name, dims, ty }, offset));
        }
        let data = pad(c.at as u64);
        let mut expected = 0;
        let mut tensors = Vec::with_capacity(n_tensors);
        for (info, offset) in infos {
            assert_eq!(offset, expected, "offset of {}", info.name);
            assert_eq!(
                info.dims[0] % info.ty.block_elems(),
                0,
                "row of {}",
                info.name
            );
            expected += pad(info.n_bytes());
            tensors.push((info, data + offset));
        }
        assert_eq!(bytes.len() as u64, data + expected, "file size");
        File {
            version,
            kvs,
            tensors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvs() -> Vec<(String, Value)> {
        vec![
            ("a.u32".into(), Value::U32(7)),
            ("a.i32".into(), Value::I32(-100045)),
            ("a.f32".into(), Value::F32(1e-6)),
            ("a.bool".into(), Value::Bool(true)),
            ("a.str".into(), Value::Str("qwen3".into())),
            (
                "a.strs".into(),
                Value::ArrStr(vec!["Ġthe".into(), "".into(), "<|im_end|>".into()]),
            ),
            ("a.i32s".into(), Value::ArrI32(vec![1, 3, -1])),
            ("a.f32s".into(), Value::ArrF32(vec![0.5, 0.25])),
        ]
    }

    #[test]
    fn round_trips_metadata_and_aligns_tensors() {
        let tensors = vec![
            TensorInfo {
                name: "odd".into(),
                dims: vec![3],
                ty: TensorType::F32,
            },
            TensorInfo {
                name: "q".into(),
                dims: vec![64, 2],
                ty: TensorType::Q8_0,
            },
            TensorInfo {
                name: "k".into(),
                dims: vec![256, 3],
                ty: TensorType::Q4K,
            },
        ];
        let mut w = Writer::new(Vec::new(), &kvs(), tensors.clone()).unwrap();
        let mut buf = Vec::new();
        let mut byte = 0u8;
        while w.next_tensor().is_some() {
            w.tensor(&mut buf, |_, b| {
                byte += 1;
                b.fill(byte)
            })
            .unwrap();
        }
        let bytes = w.finish().unwrap();

        let file = read::parse(&bytes);
        assert_eq!(file.version, 3);
        assert_eq!(file.kvs, kvs());
        for (want, (got, at)) in tensors.iter().zip(&file.tensors) {
            assert_eq!(want, got);
            assert_eq!(at % ALIGNMENT, 0, "{} is aligned", got.name);
        }
        // Each tensor's bytes are its own fill, in order, and padding is zeros.
        let (odd, at) = &file.tensors[0];
        let at = *at as usize;
        assert_eq!(&bytes[at..at + 12], &[1u8; 12]);
        assert!(bytes[at + 12..at + 32].iter().all(|&b| b == 0));
        assert_eq!(odd.n_bytes(), 12);
        let (q, at) = &file.tensors[1];
        assert_eq!(q.n_bytes(), 2 * 2 * 34);
        assert!(bytes[*at as usize..][..136].iter().all(|&b| b == 2));
        let (k, at) = &file.tensors[2];
        assert_eq!(k.n_bytes(), 3 * 144);
        assert!(bytes[*at as usize..][..432].iter().all(|&b| b == 3));
    }

    #[test]
    fn fill_sees_whole_blocks_only() {
        // 5 MiB of Q6_K in 4 MiB chunks: every call must be a multiple of the block size.
        let rows = (5 << 20) / 210 + 1;
        let info = TensorInfo {
            name: "big".into(),
            dims: vec![256, rows],
            ty: TensorType::Q6K,
        };
        let mut w = Writer::new(io::sink(), &[], vec![info.clone()]).unwrap();
        let mut calls = Vec::new();
        let n = w
            .tensor(&mut Vec::new(), |at, b| calls.push((at, b.len() as u64)))
            .unwrap();
        assert_eq!(n, info.n_bytes());
        assert!(calls.len() > 1);
        assert!(calls.iter().all(|(_, len)| len.is_multiple_of(210)));
        // Offsets are contiguous and cover the tensor.
        let mut next = 0;
        for (at, len) in calls {
            assert_eq!(at, next);
            next += len;
        }
        assert_eq!(next, info.n_bytes());
    }
}
