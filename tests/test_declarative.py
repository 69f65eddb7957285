"""Declarative [[rule]] tables: loaded from TOML, both directions, errors that name file/rule/key."""

import textwrap

import pytest
import torch

import paged_ops  # noqa: F401  (tsan_test::paged_gather, a real op with a CPU kernel)
from tsan_paged import ConfigError, PagedSanitizer, PageTableViolation
from tsan_paged.registry import Registry

RULES = textwrap.dedent("""
    [[rule]]
    target = "tsan_test::paged_gather"
    table = "block_table"
    lengths = "seq_lens"
    buffers = ["kv_pages"]
    page_size = "page_size"

    [[rule]]
    target = "csr_kernels:paged_csr_decode"
    table = "indices"
    indptr = "indptr"
    last_page_len = "last_page_len"
    buffers = ["cache[0]", "cache[1]"]
    page_size = "cache[0].shape[1]"

    [[rule]]
    target = "csr_kernels:drifted"
    table = "page_table"
    lengths = "seq_lens"
    buffers = ["pages"]
    page_size = 4
""")

CSR_MODULE = textwrap.dedent("""
    import torch

    def paged_csr_decode(cache, indptr, indices, last_page_len):
        # A real CPU kernel: sum of every token each row reads from K.
        k = cache[0]
        out = []
        for r in range(indptr.shape[0] - 1):
            pages = indices[indptr[r]:indptr[r + 1]].long()
            rows = k[pages].reshape(-1, k.shape[-1])
            keep = (pages.shape[0] - 1) * k.shape[1] + int(last_page_len[r]) if pages.numel() else 0
            out.append(rows[:keep].sum(0))
        return torch.stack(out)

    def drifted(pages, block_table, seq_lens):  # the rule still says page_table
        return pages[block_table.long()]
""")


@pytest.fixture
def config(tmp_path, monkeypatch):
    (tmp_path / "csr_kernels.py").write_text(CSR_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    return path


def csr_inputs():
    cache = (torch.randn(10, 4, 3), torch.randn(10, 4, 3))
    indptr = torch.tensor([0, 2, 2, 5], dtype=torch.int32)  # row 1 is empty
    indices = torch.tensor([3, 1, 7, 0, 9, 99], dtype=torch.int32)  # 99 is past indptr[-1]: never read
    last_page_len = torch.tensor([4, 0, 2], dtype=torch.int32)
    return cache, indptr, indices, last_page_len


def test_toml_rules_both_directions(config):
    import csr_kernels

    with PagedSanitizer(mode="raise", config=config, registry=Registry()) as san:
        out = csr_kernels.paged_csr_decode(*csr_inputs())  # valid, with an empty row
        assert out.shape == (3, 3)
        kv = torch.randn(10, 4, 3)
        torch.ops.tsan_test.paged_gather(kv, torch.tensor([[3, 1, 7]], dtype=torch.int32), torch.tensor([9]), 4)
    assert [v.check for v in san.reports] == ["rule-unbound"]  # only the drifted rule, named with its argument
    assert san.reports[0].arg == "csr_kernels:drifted" and "page_table" in san.reports[0].message

    cache, indptr, indices, last = csr_inputs()
    indices[3] = 10  # row 2, its second page
    with PagedSanitizer(mode="raise", config=config, registry=Registry()):
        with pytest.raises(PageTableViolation) as info:
            csr_kernels.paged_csr_decode(cache, indptr, indices, last)
        v = info.value.violations[0]
        assert (v.check, v.arg, v.index, v.value, v.bound) == ("page-out-of-range", "indices", (2, 1), 10, 10)
        with pytest.raises(PageTableViolation) as info:
            torch.ops.tsan_test.paged_gather(torch.randn(10, 4, 3), torch.tensor([[3, 10, 7]], dtype=torch.int32),
                                             torch.tensor([6]), 4)
        assert info.value.violations[0].index == (0, 1)


def test_csr_per_row_checks(config):
    import csr_kernels

    cache, indptr, indices, last = csr_inputs()
    last[2] = 5  # 5 tokens in a last page of 4
    with PagedSanitizer(mode="raise", config=config, registry=Registry()), pytest.raises(PageTableViolation) as info:
        csr_kernels.paged_csr_decode(cache, indptr, indices, last)
    v = info.value.violations[0]
    assert (v.check, v.arg, v.index, v.value, v.bound) == ("seq-len-exceeds-table", "last_page_len", (2,), 5, 4)
    cache, indptr, indices, last = csr_inputs()
    indptr[3] = 7  # past the indices array
    with PagedSanitizer(mode="raise", config=config, registry=Registry()), pytest.raises(PageTableViolation) as info:
        csr_kernels.paged_csr_decode(cache, indptr, indices, last)
    assert (info.value.violations[0].check, info.value.violations[0].arg) == ("shape-mismatch", "indptr")


def test_the_config_rules_add_to_the_built_ins(config):
    san = PagedSanitizer(config=config)
    targets = set(san.registry.rules)
    assert "flashinfer.decode:trtllm_batch_decode_with_kv_cache" in targets and "csr_kernels:drifted" in targets
    assert [r.source for r in san.registry.for_target("csr_kernels:drifted")] == [str(config)]


@pytest.mark.parametrize("rule,message", [
    ('target = "x::y"\ntable = "t"\n', "rule 1 (x::y): missing key 'buffers'"),
    ('target = "x::y"\ntable = "t"\nbuffers = ["b"]\ncolumns = 3\n', "rule 1 (x::y): unknown key 'columns'"),
    ('target = "x::y"\ntable = "t"\nbuffers = ["b"]\nchecks = ["page-oob"]\n', "unknown check id 'page-oob'"),
    ('target = "x::y"\ntable = "t"\nbuffers = ["b"]\nlengths = "l"\n', "missing key 'page_size'"),
    ('target = "x::y"\ntable = "t"\nbuffers = ["b"]\npage_size = "b.shape[one]"\n', "key 'page_size'"),
    ('target = "nope"\ntable = "t"\nbuffers = ["b"]\n', "key 'target'"),
    ('target = "x::y"\ntable = "t t"\nbuffers = ["b"]\n', "key 'table'"),
])
def test_malformed_rules_name_file_rule_and_key(tmp_path, rule, message):
    path = tmp_path / "bad.toml"
    path.write_text("[[rule]]\n" + rule)
    with pytest.raises(ConfigError) as info:
        PagedSanitizer(config=path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_checks_key_selects_checks(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[rule]]\ntarget = "tsan_test::paged_gather"\ntable = "block_table"\nlengths = "seq_lens"\n'
                    'buffers = ["kv_pages"]\npage_size = "page_size"\nchecks = ["seq-len-exceeds-table"]\n')
    with PagedSanitizer(mode="raise", config=path, registry=Registry()) as san:
        with pytest.raises(IndexError):  # page 10 of 10 is not checked by this rule: the real kernel fails
            torch.ops.tsan_test.paged_gather(torch.randn(10, 4, 3), torch.tensor([[10]], dtype=torch.int32),
                                             torch.tensor([2]), 4)
    assert san.reports == []


# -- properties of the CSR primitive the wrapper, append and TOML CSR rules share ---------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tsan_paged import checks  # noqa: E402


@st.composite
def csr_lists(draw):
    pages = draw(st.integers(1, 50))
    page_size = draw(st.sampled_from([1, 4, 16]))
    counts = draw(st.lists(st.integers(0, 6), min_size=1, max_size=8))  # 0: an empty row
    indptr = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    spare = draw(st.integers(0, 3))  # entries past indptr[-1]: never read
    indices = torch.tensor(draw(st.lists(st.integers(0, pages - 1), min_size=int(indptr[-1]) + spare,
                                         max_size=int(indptr[-1]) + spare)), dtype=torch.int32)
    last = torch.tensor([draw(st.integers(1, page_size)) if n else 0 for n in counts], dtype=torch.int32)
    return pages, page_size, indptr, indices, last


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(csr=csr_lists(), data=st.data())
def test_property_csr_valid_and_one_mutation(csr, data):
    pages, page_size, indptr, indices, last = csr
    assert checks.check_csr_pages(indptr, indices, last, pages, page_size, "pages") == []
    bad = data.draw(st.one_of(st.integers(-(2**31), -1), st.integers(pages, 2**31 - 1)))
    position = data.draw(st.integers(0, indices.numel() - 1)) if indices.numel() else None
    if position is None:
        return
    indices[position] = bad
    found = checks.check_csr_pages(indptr, indices, last, pages, page_size, "pages")
    if position >= int(indptr[-1]):
        assert found == []  # past the last row: never read
        return
    row = int(torch.searchsorted(indptr, torch.tensor(position), right=True)) - 1
    [v] = found
    assert (v.check, v.arg, v.index, v.value, v.bound) == (
        "page-out-of-range", "indices", (row, position - int(indptr[row])), bad, pages)
