//! Reading weights out of a checkpoint (GGUF or Hugging Face safetensors) into the forms the
//! forward pass uses: quantized matrices that stay quantized, or dense tensors in the
//! requested precision.

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::kernels::{lora, QMatrix};

/// The precision weights are served in. `Native` keeps the checkpoint's own: quantized GGUF
/// stays quantized, safetensors keep their dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Native,
    F32,
    Bf16,
    F16,
}

impl Precision {
    /// Parses the deployment `precision` names (`FP32` is hearth's own addition).
    pub fn parse(s: &str) -> Result<Precision> {
        match s.to_ascii_uppercase().as_str() {
            "" | "NATIVE" | "PRECISION_UNSPECIFIED" => Ok(Precision::Native),
            "FP32" | "F32" => Ok(Precision::F32),
            "BF16" => Ok(Precision::Bf16),
            "FP16" | "F16" => Ok(Precision::F16),
            other => Err(EngineError::InvalidRequest(format!(
                "precision {other:?} is not supported; use FP32, BF16 or FP16, or leave it unset"
            ))),
        }
    }

    fn dense_dtype(self) -> Option<DType> {
        match self {
            Precision::Native => None,
            Precision::F32 => Some(DType::F32),
            Precision::Bf16 => Some(DType::BF16),
            Precision::F16 => Some(DType::F16),
        }
    }
}

/// A weight matrix `[out, in]` and its optional bias; `forward` computes `x · Wᵀ + b` in f32.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    pub in_features: usize,
    pub out_features: usize,
}

#[derive(Debug, Clone)]
enum Weight {
    Quantized(QMatMul),
    /// Q4_1 and Q8_0 on the CPU: hearth's own kernels, repacked at load (see `crate::kernels`).
    Fast(QMatrix),
    Dense(Tensor),
}

impl Linear {
    /// `x` is `[tokens, in]` in f32; the result is `[tokens, out]` in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Quantized(q) => x.apply(q)?,
            Weight::Fast(m) => {
                // [.., in] → [.., out], like QMatMul.
                let mut dims = x.dims().to_vec();
                match dims.last_mut() {
                    Some(last) if *last == m.cols() => *last = m.rows(),
                    _ => {
                        return Err(EngineError::Internal(format!(
                            "linear: input {dims:?} does not end in the weight's {} inputs",
                            m.cols()
                        )))
                    }
                }
                let tokens = x.elem_count() / m.cols();
                let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; tokens * m.rows()];
                m.matmul(&xs, tokens, &mut out);
                Tensor::from_vec(out, dims, x.device())?
            }
            Weight::Dense(w) if w.dtype() == DType::F32 => x.matmul(&w.t()?)?,
            // Half-precision weights multiply half-precision activations; the result returns
            // to f32 so norms and residuals keep full precision.
            Weight::Dense(w) => x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32)?,
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// `x` is `[tokens, in]` in f32 on the host; the result is `[tokens, out]`. hearth's
    /// kernels read and write the buffers directly; other weights go through a tensor.
    pub fn forward_host(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        self.check_input(x, tokens)?;
        let mut y = match &self.weight {
            Weight::Fast(m) => {
                let mut out = vec![0f32; tokens * m.rows()];
                m.matmul(x, tokens, &mut out);
                out
            }
            _ => {
                let t = Tensor::from_slice(x, (tokens, self.in_features), &Device::Cpu)?;
                let y = match &self.weight {
                    Weight::Quantized(q) => t.apply(q)?,
                    Weight::Dense(w) if w.dtype() == DType::F32 => t.matmul(&w.t()?)?,
                    Weight::Dense(w) => t.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32)?,
                    Weight::Fast(_) => unreachable!("handled above"),
                };
                y.flatten_all()?.to_vec1::<f32>()?
            }
        };
        if let Some(b) = &self.bias {
            crate::kernels::ops::add_bias(&mut y, &b.to_vec1::<f32>()?);
        }
        Ok(y)
    }

    /// `forward_host` with the LoRA deltas of `groups` (runs of rows, each with an adapter's
    /// pair for this projection) added. hearth's kernels compute the two together (see
    /// `QMatrix::matmul_lora`; `delta` is its scratch, kept by the caller between calls);
    /// other weights get the deltas added after the product.
    pub fn forward_host_lora(
        &self,
        x: &[f32],
        tokens: usize,
        groups: &[lora::Group<'_>],
        delta: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        let (Weight::Fast(m), false) = (&self.weight, groups.is_empty()) else {
            let mut y = self.forward_host(x, tokens)?;
            if !groups.is_empty() {
                lora::apply(&mut y, x, self.in_features, self.out_features, groups);
            }
            return Ok(y);
        };
        self.check_input(x, tokens)?;
        let mut y = vec![0f32; tokens * m.rows()];
        m.matmul_lora(x, tokens, &mut y, groups, delta);
        if let Some(b) = &self.bias {
            crate::kernels::ops::add_bias(&mut y, &b.to_vec1::<f32>()?);
        }
        Ok(y)
    }

    /// That `x` holds `tokens` rows of this projection's inputs.
    fn check_input(&self, x: &[f32], tokens: usize) -> Result<()> {
        if x.len() != tokens * self.in_features {
            return Err(EngineError::Internal(format!(
                "linear: {} inputs for {tokens} tokens of {}",
                x.len(),
                self.in_features
            )));
        }
        Ok(())
    }

    /// Whether the weight is a dense f32 matrix.
    pub fn is_dense_f32(&self) -> bool {
        matches!(&self.weight, Weight::Dense(w) if w.dtype() == DType::F32)
    }

    /// Whether hearth's own quantized kernels run it.
    pub fn is_fast(&self) -> bool {
        matches!(self.weight, Weight::Fast(_))
    }

    /// The weight as a dense f32 tensor (for merging adapters and for tests).
    pub fn dense_f32(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            Weight::Quantized(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            Weight::Quantized(QMatMul::Tensor(t)) | Weight::Quantized(QMatMul::TensorF16(t)) => {
                t.to_dtype(DType::F32)?
            }
            Weight::Fast(m) => Tensor::from_vec(m.dequantize(), (m.rows(), m.cols()), &Device::Cpu)?,
            Weight::Dense(t) => t.to_dtype(DType::F32)?,
        })
    }

    /// This projection with `delta` (`[out, in]`, f32) added to its weight: what merging an
    /// adapter makes of it. A dense weight stays dense in its dtype; a quantized one is
    /// dequantized, summed and quantized again as Q8_0 (hearth's fast kernel on the CPU), so
    /// the merged projection keeps a quantized kernel's speed with little added error. The
    /// caller keeps `self` to restore the base exactly.
    pub fn merged(&self, delta: &Tensor) -> Result<Linear> {
        let sum = (self.dense_f32()? + delta)?;
        let weight = match &self.weight {
            Weight::Dense(w) => Weight::Dense(sum.to_dtype(w.dtype())?),
            Weight::Fast(_) | Weight::Quantized(_) => {
                let q = QTensor::quantize(&sum, GgmlDType::Q8_0)?;
                match QMatrix::from_qtensor(&q)? {
                    Some(m) if sum.device().is_cpu() => Weight::Fast(m),
                    _ => Weight::Quantized(QMatMul::from_qtensor(q)?),
                }
            }
        };
        Ok(Linear { weight, bias: self.bias.clone(), in_features: self.in_features, out_features: self.out_features })
    }

    pub fn size_in_bytes(&self) -> usize {
        match &self.weight {
            Weight::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Weight::Fast(m) => m.size_in_bytes(),
            Weight::Quantized(QMatMul::Tensor(t)) | Weight::Quantized(QMatMul::TensorF16(t)) | Weight::Dense(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
}

/// The token embedding table: looked up by id, and (when tied) the output projection.
#[derive(Debug, Clone)]
pub enum Embedding {
    Quantized(std::sync::Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    /// Rows for `ids`, as f32 `[ids, hidden]`.
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Quantized(q) => q.embedding(ids)?.to_dtype(DType::F32)?,
            Embedding::Dense(t) => t.index_select(ids, 0)?.to_dtype(DType::F32)?,
        })
    }
}

/// Where weights come from.
pub enum Checkpoint {
    Gguf { content: gguf_file::Content, file: std::fs::File, path: PathBuf },
    Hf { tensors: candle_core::safetensors::MmapedSafetensors },
}

fn open_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidModel(format!("{}: {e}", path.display()))
}

impl Checkpoint {
    pub fn open_gguf(path: &Path) -> Result<Checkpoint> {
        let mut file = std::fs::File::open(path).map_err(|e| open_err(path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| open_err(path, format!("not a readable GGUF file ({e})")))?;
        let file_len = file.metadata().map_err(|e| open_err(path, e))?.len();
        // candle checks offsets lazily; a truncated file must be refused now, with a clear
        // message, not when a tensor is first read.
        for (name, info) in &content.tensor_infos {
            let elems: usize = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            let bytes = elems / block * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > file_len {
                return Err(open_err(
                    path,
                    format!("truncated: tensor {name} ends at byte {end} but the file has {file_len} bytes"),
                ));
            }
        }
        Ok(Checkpoint::Gguf { content, file, path: path.to_path_buf() })
    }

    /// Memory-maps the safetensors files of a Hugging Face directory.
    pub fn open_hf(files: &[PathBuf]) -> Result<Checkpoint> {
        // SAFETY: the files are mapped read-only and hearth never writes to model files
        // while serving them; a file changed underneath the map by another process is
        // outside what any mmap-based loader can guard against.
        #[allow(unsafe_code)]
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
            .map_err(|e| EngineError::InvalidModel(format!("reading safetensors: {e}")))?;
        Ok(Checkpoint::Hf { tensors })
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            Checkpoint::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            Checkpoint::Hf { tensors } => tensors.get(name).is_ok(),
        }
    }

    fn qtensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        match self {
            Checkpoint::Gguf { content, file, path } => {
                content.tensor(file, name, device).map_err(|e| open_err(path, format!("tensor {name}: {e}")))
            }
            Checkpoint::Hf { .. } => Err(EngineError::Internal(format!("{name}: not a GGUF checkpoint"))),
        }
    }

    fn dense(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        match self {
            Checkpoint::Gguf { .. } => Ok(self.qtensor(name, device)?.dequantize(device)?),
            Checkpoint::Hf { tensors } => {
                Ok(tensors.load(name, device).map_err(|e| EngineError::InvalidModel(format!("tensor {name}: {e}")))?)
            }
        }
    }

    /// A 1-D f32 tensor of the expected length (norm weights, biases).
    pub fn vector(&mut self, name: &str, len: usize, device: &Device) -> Result<Tensor> {
        let t = self.dense(name, device)?.to_dtype(DType::F32)?;
        if t.dims() != [len] {
            return Err(EngineError::InvalidModel(format!("tensor {name} has shape {:?}, expected [{len}]", t.dims())));
        }
        Ok(t)
    }

    /// A linear layer `[out, in]`, kept quantized when the checkpoint is and the precision is
    /// native.
    pub fn linear(
        &mut self,
        name: &str,
        bias: Option<&str>,
        (out_f, in_f): (usize, usize),
        precision: Precision,
        device: &Device,
    ) -> Result<Linear> {
        let weight = match (&*self, precision.dense_dtype()) {
            (Checkpoint::Gguf { .. }, None) => {
                let q = self.qtensor(name, device)?;
                if q.shape().dims() != [out_f, in_f] {
                    return Err(EngineError::InvalidModel(format!(
                        "tensor {name} has shape {:?}, expected [{out_f}, {in_f}]",
                        q.shape().dims()
                    )));
                }
                // F32/F16 GGUF tensors are served as dense matrices (QMatMul would anyway).
                match q.dtype() {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Weight::Dense(q.dequantize(device)?),
                    // hearth's kernels where it has them (Q4_1, Q8_0 on the CPU), else candle's.
                    _ if device.is_cpu() => match QMatrix::from_qtensor(&q)? {
                        Some(m) => Weight::Fast(m),
                        None => Weight::Quantized(QMatMul::from_qtensor(q)?),
                    },
                    _ => Weight::Quantized(QMatMul::from_qtensor(q)?),
                }
            }
            (_, dtype) => {
                let t = self.dense(name, device)?;
                if t.dims() != [out_f, in_f] {
                    return Err(EngineError::InvalidModel(format!(
                        "tensor {name} has shape {:?}, expected [{out_f}, {in_f}]",
                        t.dims()
                    )));
                }
                let t = match dtype {
                    Some(d) => t.to_dtype(d)?,
                    // Native safetensors: keep bf16/f16 as they are; anything else computes in f32.
                    None if matches!(t.dtype(), DType::BF16 | DType::F16 | DType::F32) => t,
                    None => t.to_dtype(DType::F32)?,
                };
                Weight::Dense(t)
            }
        };
        let bias = match bias {
            Some(b) => Some(self.vector(b, out_f, device)?),
            None => None,
        };
        Ok(Linear { weight, bias, in_features: in_f, out_features: out_f })
    }

    /// The embedding table `[vocab, hidden]`.
    pub fn embedding(
        &mut self,
        name: &str,
        (vocab, hidden): (usize, usize),
        precision: Precision,
        device: &Device,
    ) -> Result<Embedding> {
        let e = match (&*self, precision.dense_dtype()) {
            (Checkpoint::Gguf { .. }, None) => {
                let q = self.qtensor(name, device)?;
                if q.shape().dims() != [vocab, hidden] {
                    return Err(EngineError::InvalidModel(format!(
                        "tensor {name} has shape {:?}, expected [{vocab}, {hidden}]",
                        q.shape().dims()
                    )));
                }
                match q.dtype() {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Embedding::Dense(q.dequantize(device)?),
                    _ => Embedding::Quantized(std::sync::Arc::new(q)),
                }
            }
            (_, dtype) => {
                let t = self.dense(name, device)?;
                if t.dims() != [vocab, hidden] {
                    return Err(EngineError::InvalidModel(format!(
                        "tensor {name} has shape {:?}, expected [{vocab}, {hidden}]",
                        t.dims()
                    )));
                }
                Embedding::Dense(match dtype {
                    Some(d) => t.to_dtype(d)?,
                    None => t,
                })
            }
        };
        Ok(e)
    }

    /// The output projection when it is the embedding table (tied weights).
    pub fn tied_output(
        &mut self,
        name: &str,
        (vocab, hidden): (usize, usize),
        precision: Precision,
        device: &Device,
    ) -> Result<Linear> {
        self.linear(name, None, (vocab, hidden), precision, device)
    }
}
