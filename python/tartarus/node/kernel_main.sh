# The shell code interpreter that runs *inside* a sandbox
# (`sb.run_code(..., language="bash")`): one bash (or, without bash, sh) process per code
# context, so variables, functions and the working directory persist between cells.
# Each request is one line: `c` and the cell's source in base64; the cell runs in this shell
# with stdin from /dev/null, its output as plain stdout and stderr; then an `error`
# event for a non-zero status and `done`, as lines starting with RS + the nonce ($1).
mark=$(printf '\036')"$1 "
count=0
while IFS= read -r request; do
    [ -n "$request" ] || continue
    count=$((count + 1))
    cell=$(printf '%s' "${request#c}" | base64 -d)
    eval "$cell" </dev/null
    status=$?
    if [ "$status" -ne 0 ]; then
        printf '%s{"type":"error","name":"ExitStatus","value":"exit status %d","traceback":""}\n' \
            "$mark" "$status"
    fi
    printf '%s{"type":"done","count":%d}\n' "$mark" "$count"
done
