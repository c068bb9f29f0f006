#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bpf_kube_proxy::fuzzing::manifests(data));
