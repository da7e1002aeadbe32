// pybind11 module fastrl._C. std::invalid_argument surfaces in Python as ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "packing.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrl native host-side utilities (sequence packing, balanced partitioning)";
  m.def("pack_sequences", &fastrl::pack_sequences, py::arg("lengths"), py::arg("budget"),
        py::call_guard<py::gil_scoped_release>(),
        "First-fit-decreasing packing of sequence lengths into bins of at most `budget` tokens.");
  m.def("partition_balanced", &fastrl::partition_balanced, py::arg("lengths"), py::arg("k"),
        py::arg("equal_size") = false, py::call_guard<py::gil_scoped_release>(),
        "Token-balanced partition into k groups by the k-way largest differencing method.");
}
