//! `--device cpu|cuda|auto` and `--threads`.

use std::str::FromStr;

use tch::Device;

/// The device asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
    /// CUDA device 0 when libtorch sees one, else the CPU.
    #[default]
    Auto,
}

impl DeviceChoice {
    /// Resolves to a tch device; asking for CUDA where there is none is an error, not a fallback.
    pub fn resolve(self) -> anyhow::Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => Ok(if tch::Cuda::is_available() {
                Device::Cuda(0)
            } else {
                Device::Cpu
            }),
            DeviceChoice::Cuda(i) => {
                let n = tch::Cuda::device_count() as usize;
                if i < n {
                    Ok(Device::Cuda(i))
                } else {
                    anyhow::bail!("device cuda:{i} asked for, but libtorch sees {n} CUDA device(s)")
                }
            }
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(i)) => Ok(DeviceChoice::Cuda(i)),
                _ => anyhow::bail!("unknown device {s:?}: expected cpu, cuda, cuda:N or auto"),
            },
        }
    }
}

/// Sets libtorch's intra-op thread count; 0 means the CPUs this process may use. libtorch's own
/// default counts the CPUs of the affinity mask, but a cgroup quota (a container's `--cpus`) is
/// what the process gets, and `available_parallelism` honours both.
pub fn set_threads(threads: usize) {
    let n = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    tch::set_num_threads(i32::try_from(n).unwrap_or(i32::MAX));
}

/// Keeps freed tensor memory in the process heap instead of handing it back to the kernel.
///
/// libtorch frees and reallocates activation buffers of the same sizes at every attack step; with
/// glibc's defaults each large one is a fresh `mmap` that the kernel must fault in and zero again
/// (about 14% of an FMN run on resnet_2b, 2 threads). The price: the process keeps its peak heap
/// until it exits (a long-running `brittle serve` stays at the size of its largest batch). Called
/// once at start-up by the binary.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is called before any other thread
    // exists, and a rejected value leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
