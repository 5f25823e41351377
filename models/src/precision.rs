//! Mixed precision for the generative ops' `precision` param.
//!
//! `bf16` runs a model's forward pass under torch's autocast with bfloat16, as
//! `torch.autocast(device_type, dtype=torch.bfloat16)` does in Python: convolutions, linear
//! layers and matrix products compute in bfloat16 (on tensor cores on a GPU, on AMX where a
//! CPU has it), normalisations, softmax and losses in float32, and the backward pass follows
//! the forward's choices. The weights, their gradients, AdamW's moments and the EMA weights stay
//! float32 (the autocast casts are of copies), so only the arithmetic of one step is rounded
//! more coarsely; the saved model is float32 either way.
//!
//! tch's own `tch::autocast` cannot do this: it turns on CUDA's autocast only, whose default
//! type is float16 (which needs loss scaling to train), and does nothing without a GPU. So
//! [`Autocast`] calls libtorch's `at::autocast` functions itself (see [`ffi`]).

use tch::Device;

/// The arithmetic a model's forward and backward passes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// float32 throughout: on one CPU the same step gives the same bytes, run after run.
    Fp32,
    /// autocast to bfloat16 (see the module doc).
    Bf16,
}

impl Precision {
    /// `f()`, with the forward passes inside it in this precision on `device`.
    pub fn run<T>(self, device: Device, f: impl FnOnce() -> T) -> T {
        match self {
            Precision::Fp32 => f(),
            Precision::Bf16 => {
                let _on = Autocast::bf16(device);
                f()
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// `f()` in float32 even inside a `bf16` region: for arithmetic that is not the model's, such
/// as finding a patch's nearest codebook entry, whose answer must not depend on the precision.
pub fn float32<T>(f: impl FnOnce() -> T) -> T {
    let _off = [ffi::CPU, ffi::CUDA].map(|device| Autocast::set(device, false, None));
    f()
}

/// bfloat16 autocast on one device type while it lives; dropping it restores what was before
/// (also when the code inside panics), and clears autocast's cache of cast weights when the
/// outermost region ends, as Python's `torch.autocast.__exit__` does.
pub struct Autocast {
    device: ffi::DeviceType,
    was_enabled: bool,
    was_dtype: ffi::ScalarType,
}

impl Autocast {
    pub fn bf16(device: Device) -> Autocast {
        let device = match device {
            Device::Cuda(_) => ffi::CUDA,
            // Autocast knows the CPU and CUDA (and devices this build does not use); everything
            // else here runs on the CPU.
            _ => ffi::CPU,
        };
        Autocast::set(device, true, Some(ffi::BFLOAT16))
    }

    /// Autocast on `device` switched `enabled`, to `dtype` if given, until dropped.
    fn set(device: ffi::DeviceType, enabled: bool, dtype: Option<ffi::ScalarType>) -> Autocast {
        // SAFETY: each function reads or writes a thread-local setting of libtorch and cannot
        // fail for the device types CPU and CUDA (only an unknown device type makes
        // `is_autocast_enabled` throw, and no C++ exception can cross into Rust here); the
        // arguments are the C++ enums' values, passed as their 8-bit underlying types.
        unsafe {
            let was_enabled = ffi::is_autocast_enabled(device);
            let was_dtype = ffi::get_autocast_dtype(device);
            if let Some(dtype) = dtype {
                ffi::set_autocast_dtype(device, dtype);
            }
            ffi::set_autocast_enabled(device, enabled);
            ffi::increment_nesting();
            Autocast {
                device,
                was_enabled,
                was_dtype,
            }
        }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: as in `Autocast::bf16`; clear_cache only drops libtorch's thread-local cache
        // of cast weights, which nothing outside the region holds on to.
        unsafe {
            if ffi::decrement_nesting() == 0 {
                ffi::clear_cache();
            }
            ffi::set_autocast_enabled(self.device, self.was_enabled);
            ffi::set_autocast_dtype(self.device, self.was_dtype);
        }
    }
}

/// libtorch's autocast switches (`ATen/autocast_mode.h`). They are C++ functions that tch and
/// torch-sys do not wrap, so they are declared here under their mangled (Itanium C++ ABI) names,
/// which `libtorch_cpu.so` exports: a libtorch without them fails at link time, not at run
/// time. Their arguments are enums whose underlying type is `int8_t` (`c10::DeviceType`,
/// `c10::ScalarType`), and `bool`; on x86-64 and aarch64 Linux a C++ free function with such
/// arguments is called exactly as a C function.
mod ffi {
    pub type DeviceType = i8;
    pub type ScalarType = i8;
    /// `c10::DeviceType::CPU`, `::CUDA`.
    pub const CPU: DeviceType = 0;
    pub const CUDA: DeviceType = 1;
    /// `c10::ScalarType::BFloat16` (its 15th type, after Bool and the three quantised ones).
    pub const BFLOAT16: ScalarType = 15;

    unsafe extern "C" {
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        pub fn is_autocast_enabled(device: DeviceType) -> bool;
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        pub fn set_autocast_enabled(device: DeviceType, enabled: bool);
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device: DeviceType) -> ScalarType;
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device: DeviceType, dtype: ScalarType);
        #[link_name = "_ZN2at8autocast17increment_nestingEv"]
        pub fn increment_nesting() -> i32;
        #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
        pub fn decrement_nesting() -> i32;
        #[link_name = "_ZN2at8autocast11clear_cacheEv"]
        pub fn clear_cache();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module};
    use tch::{Kind, Tensor};

    #[test]
    fn bf16_computes_linear_layers_in_bfloat16_and_restores_the_state() {
        let vs = nn::VarStore::new(Device::Cpu);
        let layer = nn::linear(vs.root(), 4, 3, Default::default());
        let x = Tensor::randn([2, 4], tch::kind::FLOAT_CPU);
        let (inside, loss) = Precision::Bf16.run(Device::Cpu, || {
            let y = layer.forward(&x);
            // A loss, which autocast computes in float32 (the training losses rely on it).
            let loss = y.mse_loss(&y.zeros_like(), tch::Reduction::Mean);
            (y, loss)
        });
        assert_eq!(inside.kind(), Kind::BFloat16);
        assert_eq!(loss.kind(), Kind::Float);
        // The weights themselves stay float32, and so do their gradients.
        inside.to_kind(Kind::Float).sum(Kind::Float).backward();
        for (name, t) in vs.variables() {
            assert_eq!(t.kind(), Kind::Float, "{name}");
            assert_eq!(t.grad().kind(), Kind::Float, "{name}");
        }
        // Outside the region, float32 again, and the default autocast type is untouched.
        assert_eq!(layer.forward(&x).kind(), Kind::Float);
        // SAFETY: as in `Autocast::bf16`.
        unsafe {
            assert!(!ffi::is_autocast_enabled(ffi::CPU));
            assert_eq!(ffi::get_autocast_dtype(ffi::CPU), ffi::BFLOAT16);
            assert_eq!(
                ffi::get_autocast_dtype(ffi::CUDA),
                5,
                "float16, CUDA's default"
            );
        }
        assert_eq!(
            Precision::Fp32
                .run(Device::Cpu, || layer.forward(&x))
                .kind(),
            Kind::Float
        );
        // float32 inside bf16, and bf16 again after it.
        let (exact, after) = Precision::Bf16.run(Device::Cpu, || {
            (float32(|| layer.forward(&x)), layer.forward(&x))
        });
        assert_eq!((exact.kind(), after.kind()), (Kind::Float, Kind::BFloat16));
    }
}
