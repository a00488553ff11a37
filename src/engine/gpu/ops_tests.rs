//! GPU kernels against their CPU scalar twins (`kernels/ops.rs`) on random inputs.
