"""`peft_selective.utils.machine.cpu_info`: what result files record about the CPU (its kind decides the kernels)."""

from peft_selective.utils.machine import cpu_info


ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 avx512bw sha_ni

processor\t: 1
model name\t: another CPU, never read
"""


def test_the_first_cpus_kind_and_its_kernel_flags_are_recorded():
    assert cpu_info(ZEN4) == {
        "cpu_model": "AMD EPYC",
        "cpu_family_model_stepping": "25/17/1",
        "cpu_flags": ["avx2", "avx512_bf16", "avx512bw", "avx512f"],
    }


def test_a_cpuinfo_without_numbers_or_flags_records_what_it_has():
    assert cpu_info("model name\t: Some CPU\n") == {"cpu_model": "Some CPU"}
    assert cpu_info("") == {}
