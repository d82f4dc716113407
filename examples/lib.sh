# Sourced by the serving examples (bash).
#
# merge_lora_modules NAME=PATH [VLLM ARGS...] sets the array VLLM_ARGS to the arguments with
# every --lora-modules value folded into ONE --lora-modules list that starts with NAME=PATH.
# vLLM keeps only the last --lora-modules it is given, so an extra `--lora-modules other=...`
# after `--` would otherwise replace the encrypted adapter instead of adding to it.
merge_lora_modules() {
    local modules=("$1")
    local rest=()
    shift
    while [ "$#" -gt 0 ]; do
        case "$1" in
        --lora-modules=*)
            modules+=("${1#--lora-modules=}")
            shift
            ;;
        --lora-modules)
            shift
            while [ "$#" -gt 0 ] && [ "${1#--}" = "$1" ]; do
                modules+=("$1")
                shift
            done
            ;;
        *)
            rest+=("$1")
            shift
            ;;
        esac
    done
    VLLM_ARGS=(--lora-modules "${modules[@]}" "${rest[@]}")
}
