#!/usr/bin/env bash
# The baseline: what a Linux user writes instead of sfwatch.
#
#   bench/baseline.sh INBOX BASE_URL [PARALLEL]      (the key in $SILICONFLOW_API_KEY)
#
# Every audio file closed after writing (close_write) or moved into INBOX
# (moved_to) is posted with curl -F; the API's JSON answer is written beside it
# as NAME.txt. PARALLEL=1 (the default) is the plain loop; PARALLEL>1 runs that
# many curls at once through xargs -P.
set -u
inbox=$1
url=$2
parallel=${3:-1}
model=FunAudioLLM/SenseVoiceSmall

if [ "$parallel" -le 1 ]; then
  inotifywait -m -e close_write,moved_to --format '%w%f' "$inbox" |
    while IFS= read -r f; do
      case "$f" in
        *.wav | *.mp3 | *.m4a | *.flac | *.ogg)
          curl -sS -H "Authorization: Bearer $SILICONFLOW_API_KEY" -F "model=$model" \
            -F "file=@$f" "$url/audio/transcriptions" -o "${f%.*}.txt"
          ;;
      esac
    done
else
  export url model
  inotifywait -m -e close_write,moved_to --format '%w%f' "$inbox" |
    grep --line-buffered -E '\.(wav|mp3|m4a|flac|ogg)$' |
    xargs -d '\n' -n 1 -P "$parallel" sh -c \
      'curl -sS -H "Authorization: Bearer $SILICONFLOW_API_KEY" -F "model=$model" \
         -F "file=@$1" "$url/audio/transcriptions" -o "${1%.*}.txt"' sh
fi
