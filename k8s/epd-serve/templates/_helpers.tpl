{{/* Names and labels. */}}
{{- define "epd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "epd.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "epd.labels" -}}
{{ include "epd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "epd.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "epd.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{ .Values.apiKeys.existingSecret }}
{{- else if .Values.apiKeys.create -}}
{{ include "epd.fullname" . }}-api-keys
{{- end -}}
{{- end -}}

{{/*
The worker groups the topology runs, as "group=roles" words: a role set that prefills (p, ep, pd,
epd) runs in the prefill group, as `epd serve` counts it under --prefill.
*/}}
{{- define "epd.groups" -}}
{{- $t := .Values.topology -}}
{{- if eq $t "e+p+d" -}}encode=e prefill=p decode=d
{{- else if eq $t "ep+d" -}}prefill=ep decode=d
{{- else if eq $t "e+pd" -}}encode=e prefill=pd
{{- else -}}prefill=epd
{{- end -}}
{{- end -}}

{{- define "epd.groupReplicas" -}}
{{- $ctx := index . 0 -}}{{- $group := index . 1 -}}
{{- $found := 0 -}}
{{- range splitList " " (include "epd.groups" $ctx) -}}
{{- if eq (index (splitList "=" .) 0) $group -}}{{- $found = 1 -}}{{- end -}}
{{- end -}}
{{- if $found -}}{{ (index $ctx.Values.workerGroups $group).replicas }}{{- else -}}0{{- end -}}
{{- end -}}

{{/* The Ray Serve config: the same settings as `epd serve` flags (serving/gateway/app_builder.py). */}}
{{- define "epd.serveConfig" -}}
proxy_location: HeadOnly
http_options:
  host: 0.0.0.0
  port: 8000
applications:
  - name: epd
    route_prefix: /
    import_path: serving.gateway.app_builder:build_app
    args:
      deployment_id: {{ include "epd.fullname" . | quote }}
      role_resources: true
      host: 0.0.0.0
      model: {{ printf "%s/%s" .Values.model.mountPath .Values.model.name | quote }}
      topology: {{ .Values.topology | quote }}
      encode: {{ include "epd.groupReplicas" (list . "encode") }}
      prefill: {{ include "epd.groupReplicas" (list . "prefill") }}
      decode: {{ include "epd.groupReplicas" (list . "decode") }}
      slo_ttft: {{ .Values.slo.ttftSeconds }}
      slo_tpot: {{ .Values.slo.tpotSeconds }}
      slo_attainment: {{ .Values.slo.attainmentTarget }}
      controller: {{ .Values.controller.mode | quote }}
      controller_tick: {{ .Values.controller.tickSeconds }}
      controller_window: {{ .Values.controller.windowSeconds }}
      controller_cooldown: {{ .Values.controller.cooldownSeconds }}
      controller_min_workers: {{ .Values.controller.minWorkers }}
      controller_max_workers: {{ .Values.controller.maxWorkers }}
      max_concurrent: {{ .Values.limits.maxConcurrent }}
      max_queued: {{ .Values.limits.maxQueued }}
      max_model_len: {{ .Values.limits.maxModelLen }}
      max_body_mb: {{ .Values.limits.maxBodyMb }}
      shutdown_grace: {{ .Values.limits.shutdownGraceSeconds }}
      max_worker_restarts: {{ .Values.limits.maxWorkerRestarts }}
      drain_timeout: {{ .Values.limits.drainTimeoutSeconds }}
      wait_for_worker: {{ .Values.limits.waitForWorkerSeconds }}
      gateway_replicas: {{ .Values.head.gatewayReplicas }}
      dtype: {{ .Values.dtype | quote }}
      kv_cache_memory: {{ .Values.engine.kvCacheMemory | quote }}
      {{- with .Values.engine.gpuMemoryUtilization }}
      gpu_memory_utilization: {{ . }}
      {{- end }}
      max_num_seqs: {{ .Values.engine.maxNumSeqs }}
      block_size: {{ .Values.engine.blockSize }}
      max_step_tokens: {{ .Values.engine.maxStepTokens }}
      max_encode_patches: {{ .Values.engine.maxEncodePatches }}
      image_pruning_rate: {{ .Values.efficiency.imagePruningRate }}
      video_pruning_rate: {{ .Values.efficiency.videoPruningRate }}
      max_pruning_rate: {{ .Values.efficiency.maxPruningRate }}
      visual_kv_budget: {{ .Values.efficiency.visualKvBudget }}
      kv_transfer_dtype: {{ .Values.efficiency.kvTransferDtype | quote }}
      media_decode: {{ .Values.efficiency.mediaDecode | quote }}
      metrics_require_key: {{ .Values.metricsRequireKey }}
      {{- if .Values.grpc.enabled }}
      grpc_port: {{ .Values.grpc.port }}
      {{- end }}
      {{- with .Values.allowMediaHosts }}
      allow_media_host: {{ toJson . }}
      {{- end }}
{{- end -}}

{{/* Volumes every Ray pod mounts: the model (read-only) and /dev/shm for Ray's object store. */}}
{{- define "epd.volumes" -}}
{{- $m := .ctx.Values.model -}}
- name: model
{{- if eq $m.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
  hostPath:
    path: {{ $m.hostPath.path }}
    type: Directory
{{- else }}
  emptyDir:
    sizeLimit: {{ $m.objectStore.sizeLimit }}
{{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "epd.initContainers" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "objectStore" }}
initContainers:
  - name: fetch-model
    image: {{ $m.objectStore.image }}
    command: {{ toJson $m.objectStore.command }}
    env:
      - name: MODEL_URI
        value: {{ $m.objectStore.uri | quote }}
      - name: MODEL_DIR
        value: {{ printf "%s/%s" $m.mountPath $m.name | quote }}
    {{- with $m.objectStore.credentialsSecret }}
    envFrom:
      - secretRef:
          name: {{ . }}
    {{- end }}
    volumeMounts:
      - name: model
        mountPath: {{ $m.mountPath }}
    securityContext:
      {{- toYaml $.Values.securityContext | nindent 6 }}
{{- end }}
{{- end -}}

{{- define "epd.volumeMounts" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: {{ ne .Values.model.source "objectStore" }}
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/*
A digest of what the workers' engines are built from. A new Serve config reuses running workers
(found by name), so a change here must start a new Ray cluster instead: it sits in the pod templates,
which KubeRay treats as a cluster change (a zero-downtime NewCluster upgrade).
*/}}
{{- define "epd.engineAnnotation" -}}
epd-serve/engine-config: {{ list .Values.model .Values.dtype .Values.limits.maxModelLen .Values.topology .Values.engine | toJson | sha256sum | trunc 16 | quote }}
{{- end -}}
